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

`verify()` walks everything and names the first bad record. What it cannot catch: someone who
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
from dataclasses import asdict, dataclass
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


@dataclass
class VerifyReport:
    ok: bool
    records: int
    checkpoints: int
    head_seq: int | None
    first_bad: int | None = None
    problem: str | None = None
    key_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    def verify(self, public_key: bytes | None = None) -> VerifyReport:
        """Walk the chain, the checkpoints and the head; name the first bad record."""
        if public_key is None:
            try:
                public_key = signing.load_signer(create=False).public_bytes if self._signer is None else self._signer.public_bytes
            except CodemoatError:
                public_key = None
        kid = signing.key_id(public_key) if public_key else None
        problems: list[tuple[int, str]] = []

        def bad_sig(what: str, key_id: str, message: bytes, sig: str) -> str | None:
            if public_key is None:
                return f"{what} cannot be checked: this machine has no audit-signing key"
            if key_id != kid:
                return f"{what} is signed by key {key_id}, not this machine's audit key {kid}"
            if not signing.verify(public_key, message, sig):
                return f"{what} has an invalid signature"
            return None

        with self.engine.connect() as c:
            cps = c.execute(sa.select(checkpoints).order_by(checkpoints.c.seq)).all()
            h = c.execute(sa.select(head).where(head.c.id == 1)).first()
            prev_cp = 0
            for cp in cps:
                why = bad_sig(f"checkpoint at record {cp.seq}", cp.key_id, checkpoint_message(cp.seq, cp.hash, cp.prev_checkpoint, cp.ts_us, cp.reason), cp.signature)
                if why:
                    problems.append((prev_cp + 1, why))
                    break
                if cp.prev_checkpoint != prev_cp:
                    problems.append((min(prev_cp, cp.prev_checkpoint) + 1, f"the checkpoint at record {cp.prev_checkpoint} was deleted (the checkpoint at {cp.seq} follows it)"))
                    break
                prev_cp = cp.seq
            cp_by_seq = {cp.seq: cp for cp in cps}
            cp_prev = {cp.seq: cp.prev_checkpoint for cp in cps}

            expected, prev_hash, n = 1, GENESIS, 0
            hashes_at: dict[int, str] = {}
            want = set(cp_by_seq) | ({h.seq} if h is not None else set())
            for r in c.execution_options(yield_per=2000).execute(sa.select(records).order_by(records.c.seq)):
                row = r._asdict()
                n += 1
                seq = row["seq"]
                if seq != expected:
                    what = f"record {expected} is missing (deleted)" if seq == expected + 1 else f"records {expected}–{seq - 1} are missing (deleted)"
                    problems.append((expected, what))
                    break
                if row["prev_hash"] != prev_hash:
                    # Record seq-1 was re-hashed after an edit, or inserted (seqs renumbered): either way
                    # the boundary is where the chain breaks.
                    problems.append((max(1, seq - 1), f"the chain breaks between records {seq - 1} and {seq}: record {seq - 1} was altered and re-hashed, or a record was inserted or deleted there"))
                    break
                if record_hash(row) != row["hash"]:
                    problems.append((seq, f"record {seq} was edited (its contents no longer match its hash)"))
                    break
                cp = cp_by_seq.get(seq)
                if cp is not None and cp.hash != row["hash"]:
                    start = cp_prev[seq] + 1
                    problems.append((start, f"records {start}–{seq} were rewritten (they no longer match the signed checkpoint at record {seq})"))
                    break
                if seq in want:
                    hashes_at[seq] = row["hash"]
                prev_hash, expected = row["hash"], seq + 1
            else:
                last = expected - 1
                beyond = [cp.seq for cp in cps if cp.seq > last]
                if beyond:
                    problems.append((last + 1, f"the log was truncated: a signed checkpoint covers record {beyond[-1]} but the log ends at record {last}"))
                if h is None:
                    if last:
                        problems.append((last, "the signed head is missing (records exist but nothing signs the end of the log)"))
                else:
                    why = bad_sig("the head", h.key_id, head_message(h.seq, h.hash, h.last_checkpoint, h.ts_us), h.signature)
                    if why:
                        problems.append((min(h.seq, last) or 1, why))
                    elif h.seq > last:
                        problems.append((last + 1, f"the log was truncated: the signed head names record {h.seq} but the log ends at record {last}"))
                    elif h.seq < last:
                        problems.append((h.seq + 1, f"records {h.seq + 1}–{last} were added after the signed head"))
                    elif hashes_at.get(h.seq) != h.hash:
                        start = h.last_checkpoint + 1 if h.last_checkpoint < h.seq else h.seq
                        problems.append((start, f"records {start}–{h.seq} were rewritten (they no longer match the signed head)"))
                    elif cps and cps[-1].seq != h.last_checkpoint:
                        problems.append((h.last_checkpoint + 1, f"the checkpoint at record {h.last_checkpoint} named by the signed head is missing"))
                problems.extend(self._check_head_file(public_key, kid, last, c))

        report = VerifyReport(ok=not problems, records=n, checkpoints=len(cps), head_seq=h.seq if h is not None else None, key_id=kid)
        if problems:
            report.first_bad, report.problem = min(problems, key=lambda p: p[0])
        return report

    def _check_head_file(self, public_key: bytes | None, kid: str | None, last: int, c) -> list[tuple[int, str]]:
        if self.head_file is None or not self.head_file.exists():
            return []
        raw = self.head_file.read_bytes()
        slots, empty = [], 0
        for i in range(0, len(raw), _SLOT):
            if not raw[i:i + _SLOT].strip(b"\x00 \n"):
                empty += 1  # never written (a new chain has only filled the other slot)
                continue
            try:
                fh = json.loads(raw[i:i + _SLOT])
                slots.append((fh, head_message(fh["seq"], fh["hash"], fh["last_checkpoint"], fh["ts_us"])))
            except (ValueError, KeyError, TypeError):
                # Slots are sector-sized and sector-aligned, so a crash does not tear them; a damaged
                # slot would otherwise let someone fall back to the older head and drop a record.
                return [(1, f"the head file {self.head_file} is damaged (slot {i // _SLOT})")]
        if not slots:
            return []
        fh, msg = max(slots, key=lambda x: x[0]["seq"])
        if empty and fh["seq"] > 1:
            return [(1, f"the head file {self.head_file} has a blank slot after record {fh['seq']}")]
        if fh.get("key_id") != kid:
            return [(1, f"the head file {self.head_file} is signed by key {fh.get('key_id')}, not this machine's audit key {kid}")]
        if public_key is None or not signing.verify(public_key, msg, fh.get("signature", "")):
            return [(1, f"the head file {self.head_file} has an invalid signature")]
        if fh["seq"] > last:
            return [(last + 1, f"the log was truncated: the head file names record {fh['seq']} but the log ends at record {last}")]
        got = c.execute(sa.select(records.c.hash).where(records.c.seq == fh["seq"])).scalar()
        if got != fh["hash"]:
            return [(1, f"records up to {fh['seq']} were rewritten (record {fh['seq']} no longer matches the head file)")]
        return []


def to_public(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as people and exports see it: ISO time, lists and dicts decoded."""
    out = dict(row)
    out["time"] = datetime.fromtimestamp(row["ts_us"] / 1_000_000, tz=timezone.utc).isoformat(timespec="microseconds")
    for k in ("repos", "snippets"):
        out[k] = json.loads(row[k]) if row.get(k) else []
    out["detail"] = json.loads(row["detail"]) if row.get("detail") else {}
    return {"seq": out.pop("seq"), "time": out.pop("time"), **out}


def parse_since(text: str | None) -> float | None:
    """`--since` as epoch seconds: an ISO date/time, or a duration back from now (90s, 15m, 2h, 7d)."""
    if not text:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip()
    if t[-1:] in units and t[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(t[:-1]) * units[t[-1]]
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise CodemoatError(f"cannot read --since {text!r}: use an ISO time (2026-11-28T10:00) or a duration (15m, 2h, 7d)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()
