"""The tamper-evident audit log: hash-chained records, signed checkpoints, a signed head.

Each record carries `prev_hash` and `hash = SHA-256(tag || canonical JSON of its fields and
prev_hash)`, so editing a record breaks its own hash and inserting or reordering one breaks the
next record's link (a Merkle–Damgård-style chain, as in Schneier & Kelsey, "Secure audit logs to
support computer forensics", ACM TISSEC 1999). Whoever can write the database can also recompute
a whole chain, so the chain is anchored by signatures of the machine's audit key:

* a **checkpoint** every `checkpoint_every` records and at shutdown signs (seq, hash, previous
  checkpoint): a rewritten stretch no longer matches its checkpoint, and a deleted checkpoint
  breaks the checkpoints' own chain;
* the **head**, re-signed on every append (one Ed25519 signature, ~30 µs), names the last record:
  deleting records from the end (truncation) leaves the head pointing past the end. A copy of the
  head is also written to a file outside the database, so dropping the tables is caught too.

`verify()` (in `audit.verify`) walks everything and names the first bad record. What it cannot catch: someone who
holds the signing key (root on this machine) and rewrites everything, or rolls the database and
the head file back together to an earlier state; exporting checkpoints off the machine
(`codemoat audit export`) defeats the latter.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from ..errors import CodemoatError
from . import signing

log = logging.getLogger("codemoat.audit")

GENESIS = "0" * 64
#: every kind of record the server writes
KINDS = ("request", "alert", "egress_blocked", "rotation")


def check_kind(kind: str | None) -> str | None:
    """`kind` if it is one the log holds (or None); an unknown one is a one-line error, not an
    empty answer."""
    if kind is not None and kind not in KINDS:
        raise CodemoatError(f"unknown record kind {kind!r}: use one of {', '.join(KINDS)}")
    return kind
_SLOT = 512  # bytes per head-file slot
_RECORD_TAG = b"codemoat-audit-record-v1\x00"

meta = sa.MetaData()
records = sa.Table(
    "audit_records", meta,
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
    "audit_checkpoints", meta,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.String(64)),
    sa.Column("prev_checkpoint", sa.BigInteger),
    sa.Column("ts_us", sa.BigInteger),
    sa.Column("reason", sa.String(16)),
    sa.Column("key_id", sa.String(16)),
    sa.Column("signature", sa.String(128)),
)
head = sa.Table(
    "audit_head", meta,
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
    "seq", "ts_us", "kind", "user", "token_id", "route", "protocol", "model", "repos", "snippets",
    "prompt_tokens", "completion_tokens", "latency_ms", "status", "client", "prompt_text",
    "completion_text", "detail", "prev_hash",
)
_INTS = ("prompt_tokens", "completion_tokens", "status")
_TEXTS = ("kind", "user", "token_id", "route", "protocol", "model", "client", "prompt_text", "completion_text")


class AuditUnavailable(CodemoatError):
    """The audit log cannot take a record, so the request is refused."""

    status = 503
    code = "audit_unavailable"


def record_hash(row: dict[str, Any]) -> str:
    """SHA-256 over the record's fields (canonical JSON) and the previous record's hash."""
    body = json.dumps({k: row.get(k) for k in FIELDS}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(_RECORD_TAG + body.encode()).hexdigest()


def checkpoint_message(seq: int, hash_: str, prev_checkpoint: int, ts_us: int, reason: str) -> bytes:
    return f"codemoat-audit-checkpoint-v1|{seq}|{hash_}|{prev_checkpoint}|{ts_us}|{reason}".encode()


def head_message(seq: int, hash_: str, last_checkpoint: int, ts_us: int) -> bytes:
    return f"codemoat-audit-head-v1|{seq}|{hash_}|{last_checkpoint}|{ts_us}".encode()


def head_file_for(url: str, home: Path) -> Path:
    """Where the out-of-database copy of the signed head lives for database `url`."""
    return home / f"audit-head-{hashlib.sha256(url.encode()).hexdigest()[:12]}.json"


def _normalise(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Coerce values to what the database gives back, so hashes recompute exactly after a round trip."""
    unknown = set(fields) - set(FIELDS) - {"ts"}
    if unknown:
        raise ValueError(f"unknown audit fields: {sorted(unknown)}")
    row: dict[str, Any] = {k: None for k in FIELDS}
    row["kind"] = kind
    ts = fields.get("ts")
    row["ts_us"] = int((time.time() if ts is None else float(ts)) * 1_000_000)
    for k in _TEXTS:
        if fields.get(k) is not None:
            row[k] = str(fields[k])
    for k in _INTS:
        if fields.get(k) is not None:
            row[k] = int(fields[k])
    if fields.get("latency_ms") is not None:
        row["latency_ms"] = round(float(fields["latency_ms"]), 3)
    for k in ("repos", "snippets"):
        if fields.get(k):
            row[k] = json.dumps([str(x) for x in fields[k]], separators=(",", ":"))
    if fields.get("detail"):
        row["detail"] = json.dumps(fields["detail"], sort_keys=True, separators=(",", ":"), default=str)
    return row


class AuditLog:
    """Append-only, hash-chained audit records over one SQLAlchemy engine (thread-safe)."""

    def __init__(
        self,
        engine: Engine,
        *,
        signer: signing.Signer | None = None,
        checkpoint_every: int = 100,
        head_file: Path | None = None,
    ):
        self.engine = engine
        self._signer = signer
        self.checkpoint_every = max(1, checkpoint_every)
        self.head_file = head_file
        self._lock = threading.Lock()
        self._head_fd: int | None = None
        self._healthy = True
        self._probed_at = 0.0
        self.failure: str | None = None

    @property
    def signer(self) -> signing.Signer:
        if self._signer is None:
            self._signer = signing.load_signer()
        return self._signer

    # -- writing ------------------------------------------------------------------
    def append(self, kind: str = "request", **fields: Any) -> int:
        """Append one record and re-sign the head; returns its sequence number.

        Raises `AuditUnavailable` when it cannot be written (the caller must not serve)."""
        row = _normalise(kind, fields)
        with self._lock:
            try:
                seq, head_row = self._append_locked(row)
            except AuditUnavailable as e:
                self._mark_failed(str(e))
                raise
            except (DBAPIError, OSError) as e:
                self._mark_failed(f"{type(e).__name__}: {str(e).splitlines()[0]}")
                raise AuditUnavailable(f"audit log cannot be written: {self.failure}") from None
            self._healthy, self.failure, self._probed_at = True, None, time.monotonic()
        self._write_head_file(head_row)
        return seq

    def _append_locked(self, row: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        signer = self.signer
        for attempt in range(10):
            try:
                with self.engine.begin() as c:
                    h = c.execute(sa.select(head).where(head.c.id == 1).with_for_update()).first()
                    if h is None and c.execute(sa.select(sa.func.count()).select_from(records)).scalar():
                        raise AuditUnavailable("audit log tampered: records exist but the signed head is missing (run `codemoat audit verify`)")
                    seq = (h.seq if h else 0) + 1
                    last_cp = h.last_checkpoint if h else 0
                    row.update(seq=seq, prev_hash=h.hash if h else GENESIS)
                    row["hash"] = record_hash(row)
                    c.execute(records.insert().values(**row))
                    if seq % self.checkpoint_every == 0:
                        self._insert_checkpoint(c, seq, row["hash"], last_cp, row["ts_us"], "periodic")
                        last_cp = seq
                    head_row = self._signed_head(seq, row["hash"], last_cp, row["ts_us"])
                    if h is None:
                        c.execute(head.insert().values(id=1, **head_row))
                    else:
                        c.execute(head.update().where(head.c.id == 1).values(**head_row))
                return seq, head_row
            except IntegrityError:
                # Another writer (a replica) took this sequence number; if the head did not move,
                # the record beyond it was put there behind the log's back.
                with self.engine.connect() as c:
                    h2 = c.execute(sa.select(head.c.seq).where(head.c.id == 1)).scalar()
                if h2 == (h.seq if h else None):
                    raise AuditUnavailable(
                        f"audit log tampered: record {seq} exists beyond the signed head (run `codemoat audit verify`)"
                    ) from None
            except DBAPIError as e:
                if "locked" not in str(e).lower() or attempt == 9:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AuditUnavailable("audit log busy: could not append after 10 attempts")

    def _signed_head(self, seq: int, hash_: str, last_cp: int, ts_us: int) -> dict[str, Any]:
        sig = self.signer.sign(head_message(seq, hash_, last_cp, ts_us))
        return dict(seq=seq, hash=hash_, last_checkpoint=last_cp, ts_us=ts_us, key_id=self.signer.key_id, signature=sig)

    def _insert_checkpoint(self, c, seq: int, hash_: str, prev_cp: int, ts_us: int, reason: str) -> None:
        sig = self.signer.sign(checkpoint_message(seq, hash_, prev_cp, ts_us, reason))
        c.execute(checkpoints.insert().values(
            seq=seq, hash=hash_, prev_checkpoint=prev_cp, ts_us=ts_us, reason=reason, key_id=self.signer.key_id, signature=sig,
        ))

    def checkpoint(self, reason: str = "shutdown") -> int | None:
        """Sign a checkpoint at the current head (at shutdown); None when there is nothing new."""
        with self._lock, self.engine.begin() as c:
            h = c.execute(sa.select(head).where(head.c.id == 1).with_for_update()).first()
            if h is None or h.last_checkpoint == h.seq:
                return None
            ts_us = int(time.time() * 1_000_000)
            self._insert_checkpoint(c, h.seq, h.hash, h.last_checkpoint, ts_us, reason)
            head_row = self._signed_head(h.seq, h.hash, h.seq, ts_us)
            c.execute(head.update().where(head.c.id == 1).values(**head_row))
        self._write_head_file(head_row)
        return h.seq

    def _write_head_file(self, head_row: dict[str, Any]) -> None:
        """Write the signed head into one of two fixed 512-byte slots (by seq parity), in place.

        A rename per append costs milliseconds on some filesystems; an in-place write does not,
        and with two slots a write torn by a crash leaves the other (one record older) intact."""
        if self.head_file is None:
            return
        data = json.dumps(head_row, separators=(",", ":")).encode()
        data = data.ljust(_SLOT - 1) + b"\n"
        try:
            if self._head_fd is None:
                self._head_fd = os.open(self.head_file, os.O_RDWR | os.O_CREAT, 0o600)
            os.pwrite(self._head_fd, data, (head_row["seq"] % 2) * _SLOT)
        except OSError as e:  # the database copy is authoritative; a missing file copy only weakens verify
            log.warning("could not write the audit head file %s: %s", self.head_file, e)

    def _mark_failed(self, why: str) -> None:
        self._healthy, self.failure = False, why
        log.error("audit log unavailable: %s", why)

    @property
    def known_writable(self) -> bool:
        """True when a probe or an append succeeded within the last second (no I/O needed)."""
        return self._healthy and time.monotonic() - self._probed_at < 1.0

    def check_writable(self, min_free_bytes: int = 16 << 20) -> bool:
        """Whether a record can be written now (cheap when healthy; probes the database at most once a second)."""
        now = time.monotonic()
        if self._healthy and now - self._probed_at < 1.0:
            return True
        self._probed_at = now
        try:
            url = self.engine.url
            if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
                free = shutil.disk_usage(Path(url.database).parent).free
                if free < min_free_bytes:
                    raise AuditUnavailable(f"only {free} bytes free beside the audit database")
            with self.engine.begin() as c:  # a write that changes nothing: fails on read-only or missing tables
                c.execute(records.update().where(records.c.seq == -1).values(kind="probe"))
            if self.failure and "tampered" in self.failure:
                return False
            self._healthy = True
            return True
        except (AuditUnavailable, DBAPIError, OSError) as e:
            self._mark_failed(f"{type(e).__name__}: {str(e).splitlines()[0]}")
            return False

    def rotate(self, archive: Path) -> dict[str, Any]:
        """Move every record, checkpoint and the head into `archive` (JSON lines) and start a new chain.

        For retention, and to resume after tampering has been investigated. The new chain's first
        record (kind `rotation`, signed like any other) holds the archive's SHA-256, the number of
        records moved, the old head's hash and what `verify` said of the old chain, so the archive
        stays anchored to the live log."""
        rep = self.verify()
        if archive.exists():
            raise CodemoatError(f"{archive} already exists: choose a new archive file")
        digest = hashlib.sha256()
        with self._lock:
            with self.engine.begin() as c, open(archive, "x", encoding="utf-8") as f:
                def out(obj: dict[str, Any]) -> None:
                    line = (json.dumps(obj, ensure_ascii=False, default=str) + "\n").encode()
                    digest.update(line)
                    f.write(line.decode())

                out({"entry": "archive", "format": "codemoat-audit-archive-v1", "verify": rep.to_dict()})
                n = 0
                for r in c.execute(sa.select(records).order_by(records.c.seq)):
                    out({"entry": "record", **r._asdict()})
                    n += 1
                for cp in c.execute(sa.select(checkpoints).order_by(checkpoints.c.seq)):
                    out({"entry": "checkpoint", **cp._asdict()})
                h = c.execute(sa.select(head).where(head.c.id == 1)).first()
                if h is not None:
                    out({"entry": "head", **h._asdict()})
                for t in (records, checkpoints, head):
                    c.execute(t.delete())
                if self.head_file is not None and self.head_file.exists():
                    os.truncate(self.head_file, 0)  # in place: writers keep their open descriptors
            os.chmod(archive, 0o600)
            self._healthy, self.failure = True, None
        detail = {"archive": str(archive), "archive_sha256": digest.hexdigest(), "records": n,
                  "previous_head": h.hash if h is not None else None, "previous_ok": rep.ok, "previous_problem": rep.problem}
        self.append("rotation", detail=detail)
        return detail

    # -- reading --------------------------------------------------------------------
    def records(
        self, *, since: float | None = None, kind: str | None = None, user: str | None = None,
        after_seq: int = 0, limit: int | None = None, newest_first: bool = False,
    ) -> Iterator[dict[str, Any]]:
        q = sa.select(records).where(records.c.seq > after_seq)
        if since is not None:
            q = q.where(records.c.ts_us >= int(since * 1_000_000))
        if kind is not None:
            q = q.where(records.c.kind == kind)
        if user is not None:
            q = q.where(records.c.user == user)
        q = q.order_by(records.c.seq.desc() if newest_first else records.c.seq)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as c:
            for r in c.execution_options(yield_per=1000).execute(q):
                yield to_public(r._asdict())

    def count(self, kind: str | None = None) -> int:
        q = sa.select(sa.func.count()).select_from(records)
        if kind is not None:
            q = q.where(records.c.kind == kind)
        with self.engine.connect() as c:
            return int(c.execute(q).scalar() or 0)

    def export(self, fmt: str = "jsonl", **filters: Any) -> Iterator[str]:
        """Records as JSON lines or CSV (with hashes, so an exported trail can be re-verified)."""
        if fmt == "jsonl":
            for r in self.records(**filters):
                yield json.dumps(r, ensure_ascii=False) + "\n"
        elif fmt == "csv":
            cols = ["seq", "time", *FIELDS[2:], "hash"]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            yield buf.getvalue()
            for r in self.records(**filters):
                buf.seek(0)
                buf.truncate()
                w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
                yield buf.getvalue()
        else:
            raise CodemoatError(f"unknown export format {fmt!r}: use jsonl or csv")

    # -- verifying ------------------------------------------------------------------
    def verify(self, public_key: bytes | None = None):
        """Walk the chain, the checkpoints and the head; name the first bad record (see `audit.verify`)."""
        from .verify import verify

        return verify(self, public_key)


def to_public(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as people and exports see it: ISO time, lists and dicts decoded."""
    out = dict(row)
    out["time"] = datetime.fromtimestamp(row["ts_us"] / 1_000_000, tz=timezone.utc).isoformat(timespec="microseconds")
    for k in ("repos", "snippets"):
        out[k] = json.loads(row[k]) if row.get(k) else []
    out["detail"] = json.loads(row["detail"]) if row.get("detail") else {}
    return {"seq": out.pop("seq"), "time": out.pop("time"), **out}


def parse_since(text: str | None) -> float | None:
    """`--since` as epoch seconds: an ISO date/time, or a duration back from now (90s, 15m, 2h, 7d, 2w)."""
    if not text:
        return None
    from ..durations import parse_ago

    try:  # refuses what reaches past year 9999 (as a count of microseconds it would not fit SQLite)
        return parse_ago(text.strip())
    except CodemoatError as e:
        raise CodemoatError(f"cannot use --since {text!r}: {e}") from None
