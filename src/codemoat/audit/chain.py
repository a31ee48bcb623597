"""The audit chain's shape, shared by the writer (`audit.log`) and the verifier (`audit.verify`).

Tables, the record hash and the signed messages live here, so that both sides import them from
one place and neither imports the other. A record's `hash` (v2) is SHA-256(tag || seq || previous
hash || body), body = SHA-256(tag || canonical JSON of `BODY_FIELDS`): the link needs no JSON, so
PostgreSQL computes it in the INSERT (migrations/b003_audit_tip.py); records written before v2 hash
the JSON of all `FIELDS` (`record_hash`) and still verify. A checkpoint signs (seq, hash, previous
checkpoint, time, reason); the head signs (seq, hash, last checkpoint, time). A signed head is the
chain's counterpart of a transparency log's signed tree head (RFC 9162): whoever remembers one
can later check that the log still holds record `seq` with hash `hash` (for a hash chain, that is
the whole of RFC 9162's consistency proof between two heads).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

GENESIS = "0" * 64
HEAD_SLOT = 512  # bytes per head-file slot
_RECORD_TAG = b"codemoat-audit-record-v1\x00"
_BODY_TAG = b"codemoat-audit-body-v2\x00"
LINK_TAG = b"codemoat-audit-link-v2\x00"  # also spelled out in the PostgreSQL trigger (migrations/b003)

meta = sa.MetaData()
records = sa.Table(
    "audit_records",
    meta,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("ts_us", sa.BigInteger),
    sa.Column("kind", sa.String(32)),
    sa.Column("user", sa.String(128)),
    sa.Column("token_id", sa.String(64)),
    sa.Column("route", sa.String(256)),
    sa.Column("protocol", sa.String(32)),
    sa.Column("model", sa.String(256)),
    sa.Column("repos", sa.Text),
    sa.Column("snippets", sa.Text),
    sa.Column("prompt_tokens", sa.Integer),
    sa.Column("completion_tokens", sa.Integer),
    sa.Column("latency_ms", sa.Float),
    sa.Column("status", sa.Integer),
    sa.Column("client", sa.String(128)),
    sa.Column("prompt_text", sa.Text),
    sa.Column("completion_text", sa.Text),
    sa.Column("detail", sa.Text),
    sa.Column("prev_hash", sa.String(64)),
    sa.Column("hash", sa.String(64)),
)
checkpoints = sa.Table(
    "audit_checkpoints",
    meta,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.String(64)),
    sa.Column("prev_checkpoint", sa.BigInteger),
    sa.Column("ts_us", sa.BigInteger),
    sa.Column("reason", sa.String(16)),
    sa.Column("key_id", sa.String(16)),
    sa.Column("signature", sa.String(128)),
)
# The chain's tip: the last record's seq and hash, unsigned (the signed head trails it by at most
# `sign_every` records); on PostgreSQL the trigger `audit_chain` moves it (migrations/b003_audit_tip.py).
tip = sa.Table(
    "audit_tip",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger),
    sa.Column("hash", sa.String(64)),
)
head = sa.Table(
    "audit_head",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger),
    sa.Column("hash", sa.String(64)),
    sa.Column("last_checkpoint", sa.BigInteger),
    sa.Column("ts_us", sa.BigInteger),
    sa.Column("key_id", sa.String(16)),
    sa.Column("signature", sa.String(128)),
)

# The hashed fields, in the order `export --format csv` prints them.
FIELDS = (
    "seq",
    "ts_us",
    "kind",
    "user",
    "token_id",
    "route",
    "protocol",
    "model",
    "repos",
    "snippets",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "status",
    "client",
    "prompt_text",
    "completion_text",
    "detail",
    "prev_hash",
)
BODY_FIELDS = FIELDS[1:-1]  # v2's body: everything but seq and prev_hash, which the link binds


def record_hash(row: dict[str, Any]) -> str:
    """v1 (records written before chain v2): SHA-256 over the fields (canonical JSON) and prev_hash."""
    body = json.dumps({k: row.get(k) for k in FIELDS}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(_RECORD_TAG + body.encode()).hexdigest()


def body_hash(row: dict[str, Any]) -> str:
    """v2: SHA-256 over the record's own fields (canonical JSON), without seq and prev_hash, which
    the writer does not know until the chain's tip is locked (on PostgreSQL: inside the database)."""
    body = json.dumps({k: row.get(k) for k in BODY_FIELDS}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(_BODY_TAG + body.encode()).hexdigest()


def link_hash(seq: int, prev_hash: str, body: str) -> str:
    """v2: SHA-256(tag || seq as 8 bytes big-endian || previous hash || body hash), raw bytes."""
    return hashlib.sha256(LINK_TAG + seq.to_bytes(8, "big") + bytes.fromhex(prev_hash) + bytes.fromhex(body)).hexdigest()


def hash_matches(row: dict[str, Any]) -> bool:
    """Whether a stored record's `hash` is its v2 link hash, or its v1 hash (a log begun before v2)."""
    try:
        if link_hash(row["seq"], row["prev_hash"], body_hash(row)) == row["hash"]:
            return True
    except (ValueError, TypeError, OverflowError):  # a prev_hash that is not hex: not a v2 record
        pass
    return record_hash(row) == row["hash"]


def checkpoint_message(seq: int, hash_: str, prev_checkpoint: int, ts_us: int, reason: str) -> bytes:
    return f"codemoat-audit-checkpoint-v1|{seq}|{hash_}|{prev_checkpoint}|{ts_us}|{reason}".encode()


def head_message(seq: int, hash_: str, last_checkpoint: int, ts_us: int) -> bytes:
    return f"codemoat-audit-head-v1|{seq}|{hash_}|{last_checkpoint}|{ts_us}".encode()


@dataclass(frozen=True)
class SignedHead:
    """The end of the log as the audit key signed it: record `seq` has hash `hash`."""

    seq: int
    hash: str
    last_checkpoint: int
    ts_us: int
    key_id: str
    signature: str

    @classmethod
    def from_mapping(cls, d: Any) -> SignedHead:
        """From a row or a JSON object; ValueError when a field is missing or of the wrong type."""
        try:
            h = cls(**{k: d[k] for k in ("seq", "hash", "last_checkpoint", "ts_us", "key_id", "signature")})
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a signed audit head ({e})") from None
        if not all(type(getattr(h, k)) is int for k in ("seq", "last_checkpoint", "ts_us")) or not all(
            isinstance(getattr(h, k), str) for k in ("hash", "key_id", "signature")
        ):
            raise ValueError("not a signed audit head (a field has the wrong type)")
        return h

    def message(self) -> bytes:
        return head_message(self.seq, self.hash, self.last_checkpoint, self.ts_us)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _db_id(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:12]


def head_file_for(url: str, home: Path) -> Path:
    """Where the writer keeps its out-of-database copy of the signed head for database `url`."""
    return home / f"audit-head-{_db_id(url)}.json"


def verified_file_for(url: str, home: Path) -> Path:
    """Where `audit verify` remembers the last head it verified for database `url` (not the writer's file)."""
    return home / f"audit-verified-{_db_id(url)}.json"
