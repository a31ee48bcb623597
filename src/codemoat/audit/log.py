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

`verify()` (in `audit.verify`) walks everything and names the first bad record. A valid head
only says where the log ends now: someone who can write the database and the head file can put
back an older state with its own valid signatures. So `audit verify` remembers the last head it
accepted in a file of its own (`audit.trusted`; an operator can also export one off the machine)
and refuses any log that is not a continuation of it. What none of this catches: someone who holds
the signing key (the service account, or root) and rewrites and re-signs everything, unless a head
exported off the machine before the rewrite is checked against it.

The tables, the record hash and the signed messages are in `audit.chain`, which both this module
and `audit.verify` import; they are re-exported here.
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
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from ..errors import CodemoatError
from . import signing
from .pgappend import PgAppender, Tampered
from .rows import KINDS, check_kind, normalise, parse_since, to_public
from .chain import (  # re-exported: the chain's shape lives in `audit.chain`
    FIELDS,
    GENESIS,
    HEAD_SLOT,
    SignedHead,
    checkpoint_message,
    checkpoints,
    head,
    head_file_for,
    head_message,
    meta,
    record_hash,
    records,
    verified_file_for,
)

__all__ = [  # the chain's names stay importable from here (serve, tests, bench use them)
    "FIELDS",
    "GENESIS",
    "HEAD_SLOT",
    "KINDS",
    "AuditLog",
    "AuditUnavailable",
    "SignedHead",
    "check_kind",
    "checkpoint_message",
    "checkpoints",
    "head",
    "head_file_for",
    "head_message",
    "meta",
    "parse_since",
    "record_hash",
    "records",
    "to_public",
    "verified_file_for",
]

log = logging.getLogger("codemoat.audit")


class AuditUnavailable(CodemoatError):
    """The audit log cannot take a record, so the request is refused."""

    status = 503
    code = "audit_unavailable"


# records one group commit may write (a bound on one transaction's size and on a waiter's wait)
MAX_BATCH = 256


class _Pending:
    """One record waiting for a group commit, and what became of it."""

    __slots__ = ("row", "seq", "error", "done")

    def __init__(self, row: dict[str, Any]):
        self.row, self.seq, self.error, self.done = row, 0, None, False


class AuditLog:
    """Append-only, hash-chained audit records over one SQLAlchemy engine (thread-safe)."""

    def __init__(
        self,
        engine: Engine,
        *,
        signer: signing.Signer | None = None,
        checkpoint_every: int = 100,
        head_file: Path | None = None,
        verified_file: Path | None = None,
        pg_pipeline: bool = True,
    ):
        self.engine = engine
        # PostgreSQL: one writer connection in pipeline mode (`audit.pgappend`); False keeps the
        # portable SQLAlchemy path (bench/replicas.py compares the two)
        self._pg = PgAppender(engine) if pg_pipeline and engine.dialect.name == "postgresql" else None
        self._signer = signer
        self.checkpoint_every = max(1, checkpoint_every)
        self.head_file = head_file
        self.verified_file = verified_file  # the verifier's memory (`audit.trusted`), not the writer's
        self._lock = threading.Lock()
        self._pending: list[_Pending] = []  # records waiting for the next group commit
        self._pending_lock = threading.Lock()
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

        Group commit: records appended at the same time by this process's threads (concurrent
        requests) are written in one transaction under one head signature, and every caller still
        returns only once its own record is committed. The first caller in becomes the leader and
        flushes what is waiting; the others find their record written when the lock is theirs.
        Raises `AuditUnavailable` when it cannot be written (the caller must not serve)."""
        me = _Pending(normalise(kind, fields))
        with self._pending_lock:
            self._pending.append(me)
        with self._lock:
            if not me.done:
                with self._pending_lock:
                    batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                self._flush(batch)
        if me.error is not None:
            raise me.error
        return me.seq

    def _flush(self, batch: list[_Pending]) -> None:
        """Write `batch` in one transaction (under `_lock`); each waiter gets its seq or the error."""
        try:
            try:
                seqs, head_row = self._append_locked([w.row for w in batch])
            except AuditUnavailable as e:
                self._mark_failed(str(e))
                raise
            except (DBAPIError, OSError) as e:
                self._mark_failed(f"{type(e).__name__}: {str(e).splitlines()[0]}")
                raise AuditUnavailable(f"audit log cannot be written: {self.failure}") from None
        except AuditUnavailable as e:
            for w in batch:
                w.error, w.done = e, True
            return
        self._healthy, self.failure, self._probed_at = True, None, time.monotonic()
        for w, seq in zip(batch, seqs):
            w.seq, w.done = seq, True
        self._write_head_file(head_row)

    def _append_locked(self, rows: list[dict[str, Any]]) -> tuple[list[int], dict[str, Any]]:
        _ = self.signer  # load the key before taking the database's write lock
        if self._pg is not None:
            return self._append_pg(rows)
        for attempt in range(10):
            try:
                with self.engine.begin() as c:
                    h = c.execute(sa.select(head).where(head.c.id == 1).with_for_update()).first()
                    exist = h is None and bool(c.execute(sa.select(sa.func.count()).select_from(records)).scalar())
                    rows, cps, head_row = self._chain(rows, (h.seq, h.hash, h.last_checkpoint) if h else None, exist)
                    c.execute(records.insert(), rows)
                    if cps:  # checkpoints after the records they name
                        c.execute(checkpoints.insert(), cps)
                    if h is None:
                        c.execute(head.insert().values(id=1, **head_row))
                    else:
                        c.execute(head.update().where(head.c.id == 1).values(**head_row))
                return [r["seq"] for r in rows], head_row
            except IntegrityError:
                self._raise_if_tampered(h.seq if h else None)
            except DBAPIError as e:
                if "locked" not in str(e).lower() or attempt == 9:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AuditUnavailable("audit log busy: could not append after 10 attempts")

    def _append_pg(self, rows: list[dict[str, Any]]) -> tuple[list[int], dict[str, Any]]:
        """PostgreSQL: the same chain in two network flushes (`audit.pgappend`)."""
        import psycopg

        seen: list[Any] = []

        def chain(h: Any, exist: bool):
            seen.append(h)
            return self._chain(rows, h, exist)

        for _ in range(10):
            seen.clear()
            try:
                done, head_row = self._pg.append(chain)
                return [r["seq"] for r in done], head_row
            except Tampered:
                self._raise_if_tampered(seen[-1][0] if seen and seen[-1] else None)
            except psycopg.Error as e:
                raise AuditUnavailable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        raise AuditUnavailable("audit log busy: could not append after 10 attempts")

    def _raise_if_tampered(self, locked_seq: int | None) -> None:
        """After a duplicate sequence number: another writer (a replica) took it, unless the head did
        not move, in which case a record beyond it was put there behind the log's back."""
        with self.engine.connect() as c:
            h2 = c.execute(sa.select(head.c.seq).where(head.c.id == 1)).scalar()
        if h2 == locked_seq:
            raise AuditUnavailable(
                f"audit log tampered: record {(locked_seq or 0) + 1} exists beyond the signed head (run `codemoat audit verify`)"
            ) from None

    def _chain(self, rows: list[dict[str, Any]], h: Any, exist: bool):
        """Chain `rows` onto the locked head `h` (seq, hash, last_checkpoint; None: an empty log):
        the rows with seq, prev_hash and hash, the signed checkpoints due, the signed head."""
        if h is None and exist:
            raise AuditUnavailable(
                "audit log tampered: records exist but the signed head is missing (run `codemoat audit verify`)"
            )
        seq, prev, last_cp = (h[0], h[1], h[2]) if h is not None else (0, GENESIS, 0)
        cps = []
        for row in rows:
            seq += 1
            row.update(seq=seq, prev_hash=prev)
            row["hash"] = prev = record_hash(row)
            if seq % self.checkpoint_every == 0:
                cps.append(self._checkpoint_row(seq, prev, last_cp, row["ts_us"], "periodic"))
                last_cp = seq
        last = rows[-1]
        return rows, cps, self._signed_head(seq, last["hash"], last_cp, last["ts_us"])

    def _signed_head(self, seq: int, hash_: str, last_cp: int, ts_us: int) -> dict[str, Any]:
        sig = self.signer.sign(head_message(seq, hash_, last_cp, ts_us))
        return dict(seq=seq, hash=hash_, last_checkpoint=last_cp, ts_us=ts_us, key_id=self.signer.key_id, signature=sig)

    def _checkpoint_row(self, seq: int, hash_: str, prev_cp: int, ts_us: int, reason: str) -> dict[str, Any]:
        sig = self.signer.sign(checkpoint_message(seq, hash_, prev_cp, ts_us, reason))
        return dict(
            seq=seq, hash=hash_, prev_checkpoint=prev_cp, ts_us=ts_us, reason=reason, key_id=self.signer.key_id, signature=sig
        )

    def _insert_checkpoint(self, c, seq: int, hash_: str, prev_cp: int, ts_us: int, reason: str) -> None:
        c.execute(checkpoints.insert().values(**self._checkpoint_row(seq, hash_, prev_cp, ts_us, reason)))

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
        data = data.ljust(HEAD_SLOT - 1) + b"\n"
        try:
            if self._head_fd is None:
                self._head_fd = os.open(self.head_file, os.O_RDWR | os.O_CREAT, 0o600)
            os.pwrite(self._head_fd, data, (head_row["seq"] % 2) * HEAD_SLOT)
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
        detail = {
            "archive": str(archive),
            "archive_sha256": digest.hexdigest(),
            "records": n,
            "previous_head": h.hash if h is not None else None,
            "previous_ok": rep.ok,
            "previous_problem": rep.problem,
        }
        self.append("rotation", detail=detail)
        if self.verified_file is not None:  # the operator started a new chain: the verifier follows it
            from . import trusted

            with self.engine.connect() as c:
                row = c.execute(sa.select(head).where(head.c.id == 1)).first()
            trusted.remember(self.verified_file, SignedHead.from_mapping(row._asdict()), self.public_key(), reset=True)
        return detail

    # -- reading --------------------------------------------------------------------
    def records(
        self,
        *,
        since: float | None = None,
        kind: str | None = None,
        user: str | None = None,
        after_seq: int = 0,
        limit: int | None = None,
        newest_first: bool = False,
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
    def verify(self, public_key: bytes | None = None, *, trusted_head: Path | None = None):
        """Walk the chain, the checkpoints and the head; name the first bad record (see `audit.verify`).

        Also checks the log against the head verified before (`verified_file`) and an exported
        `trusted_head`; when the log is OK, `verified_file` moves on to the current head."""
        from . import trusted
        from .verify import verify

        if public_key is None:
            public_key = self.public_key()
        rep = verify(self.engine, public_key, head_file=self.head_file, remembered=self.verified_file, trusted_head=trusted_head)
        if rep.ok:  # the TPM's checkpoints and its monotonic counter, when this machine has a TPM
            from .tpm_checkpoint import check_report

            check_report(self.engine, rep)
        if rep.ok and rep.head is not None and self.verified_file is not None:
            try:
                trusted.remember(self.verified_file, rep.head, public_key)
            except OSError as e:  # the log is fine; only the memory of it could not be kept
                rep.warning = f"could not remember the verified head in {self.verified_file}: {e.strerror or e}"
        return rep

    def public_key(self) -> bytes | None:
        """The audit key's public half (None when this machine has no key yet)."""
        if self._signer is not None:
            return self._signer.public_bytes
        try:
            return signing.load_signer(create=False).public_bytes
        except CodemoatError:
            return None
