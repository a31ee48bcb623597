"""The tamper-evident audit log: hash-chained records, signed checkpoints, a signed head.

Each record carries `prev_hash` and a `hash` that binds its fields, its seq and `prev_hash` (chain
v2, `audit.chain`), so editing a record breaks its own hash and inserting or reordering one breaks
the next record's link (a Merkle–Damgård-style chain, as in Schneier & Kelsey, "Secure audit logs
to support computer forensics", ACM TISSEC 1999). Whoever can write the database can also recompute
a whole chain, so the chain is anchored by signatures of the machine's audit key (`audit.heads`):

* a **checkpoint** at every `checkpoint_every`-th record and at shutdown signs (seq, hash, previous
  checkpoint): a rewritten stretch no longer matches its checkpoint, and a deleted checkpoint
  breaks the checkpoints' own chain;
* the **head** names the chain's tip: deleting records from the end (truncation) leaves it pointing
  past the end. A copy is also written to a file outside the database, so dropping the tables is
  caught too. It is signed every `sign_every` records (1 by default here and on SQLite: after each
  append), at most `sign_interval_ms` after a record was left unsigned, and at shutdown; the
  records after it, the unsigned tail, are what `verify` reports and bounds.

`verify()` (in `audit.verify`) walks everything and names the first bad record. A valid head
only says where the log ends now: someone who can write the database and the head file can put
back an older state with its own valid signatures. So `audit verify` remembers the last head it
accepted in a file of its own (`audit.trusted`; an operator can also export one off the machine)
and refuses any log that is not a continuation of it. What none of this catches: someone who holds
the signing key (the service account, or root) and rewrites and re-signs everything, unless a head
exported off the machine before the rewrite is checked against it.

The tables, the record hash and the signed messages are in `audit.chain`, which both this module
and `audit.verify` import; they are re-exported here. When the head is signed, and signing it, is
`audit.head_signing` (a mixin of `AuditLog`); reading, exporting and verifying what was written is
`audit.reading` (another).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from . import signing
from .head_signing import HeadSigning
from .reading import LogReading
from .pending import SQLITE_REFUSALS, AlsoFailed, Pending, RecordRefused, first_line, psycopg_data_error, psycopg_error
from .heads import AuditUnavailable, batch_length, run, sign_tip
from .pgappend import PgAppender, Tampered
from .probe import WritableKeeper
from .writer import RecordWriter
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
    body_hash,
    link_hash,
    record_hash,
    records,
    tip,
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


# A write first: SQLite's write lock is taken (waiting up to busy_timeout) before the tip is read, so
# concurrent writers (processes) queue instead of failing on a stale read ("database is locked").
_LOCK_TIP = sa.text("UPDATE audit_tip SET seq = seq WHERE id = 1 RETURNING seq, hash")
_MOVE_TIP = sa.text("UPDATE audit_tip SET seq = :seq, hash = :hash WHERE id = 1")
_INSERT_RECORDS = records.insert()


class AuditLog(HeadSigning, LogReading):
    """Append-only, hash-chained audit records over one SQLAlchemy engine (thread-safe)."""

    def __init__(
        self,
        engine: Engine,
        *,
        signer: signing.Signer | None = None,
        checkpoint_every: int = 100,
        sign_every: int = 1,
        sign_interval_ms: float = 1000.0,
        head_file: Path | None = None,
        verified_file: Path | None = None,
    ):
        self.engine = engine
        # PostgreSQL: the database links records (trigger `audit_chain`), one flush per group commit
        self._pg = PgAppender(engine) if engine.dialect.name == "postgresql" else None
        self.head_file = head_file
        self.verified_file = verified_file  # the verifier's memory (`audit.trusted`), not the writer's
        self._lock = threading.Lock()
        self._pending: list[Pending] = []  # records waiting for the next group commit
        self._pending_lock = threading.Lock()
        self._healthy = True
        self._probed_at = 0.0
        self.failure: str | None = None
        self._init_signing(signer, checkpoint_every, sign_every, sign_interval_ms, head_file)
        self._writer = RecordWriter(self)  # `append_async`'s thread
        self.keeper = WritableKeeper(self)  # probes in the background while requests come (`audit.probe`)

    # -- writing ------------------------------------------------------------------
    def append(self, kind: str = "request", *, also: Callable[[sa.Connection], Any] | None = None, **fields: Any) -> int:
        """Append one record to the chain; returns its sequence number.

        `also(connection)` writes what goes with the record (a request's usage row) in the record's own
        transaction on SQLite, one commit for both; on PostgreSQL, where the database links records in a
        transaction of its own, in the next one. If it fails, the record is written without it (logged).

        Group commit: records appended at the same time by this process's threads (concurrent
        requests) are written in one transaction, and every caller still returns only once its own
        record is committed. The first caller in becomes the leader and flushes what is waiting; the
        others find their record written when the lock is theirs. The head is signed when
        `sign_every` records or `sign_interval_ms` have gone by unsigned (`audit.heads`).
        Raises `AuditUnavailable` when it cannot be written (the caller must not serve); once it is written it
        returns, also when the head after it could not be signed (PostgreSQL: `_flush`)."""
        me = Pending(normalise(kind, fields), also)
        with self._pending_lock:
            self._pending.append(me)
        with self._lock:
            while not me.done:  # records queued ahead of it may fill a batch (batch_length): then another one
                with self._pending_lock:
                    n = batch_length(w.row for w in self._pending)
                    batch, self._pending = self._pending[:n], self._pending[n:]
                self._flush(batch)
        if me.error is not None:
            raise me.error
        self._write_also(me)
        return me.seq

    async def append_async(
        self,
        kind: str = "request",
        *,
        also: Callable[[sa.Connection], Any] | None = None,
        then: Callable[[], Any] | None = None,
        **fields: Any,
    ) -> int:
        """`append` from an event loop, without a thread hop of its own: the record is queued for this log's
        writer thread, which writes it with those of concurrent requests in one group commit, runs `then()`
        (errors logged, never raised) and wakes this loop once for the batch (`audit.writer`). Returns its
        seq once it is committed; raises `AuditUnavailable` as `append` does."""
        me = Pending(normalise(kind, fields), also)
        me.then, me.fut = then, asyncio.get_running_loop().create_future()
        self._writer.submit(me)
        return await me.fut

    @property
    def commits_unconfirmed(self) -> bool:
        """Whether an append that raised may have committed all the same (PostgreSQL: `written_already`)."""
        return self._pg is not None

    def written_already(self, kind: str, fields: dict[str, Any]) -> int | None:
        """The seq of a record appended with these `fields` (its time `ts` included) that is in the chain although
        its append failed, or None; when found, what goes with it (`also`) is written now, as its append would have.
        Only PostgreSQL commits a record without its writer knowing (`audit.pgappend`: the connection lost
        with the commit's answer, and the server unreachable to read it back); a SQLite transaction that
        raised did not commit. `serve.late` asks before it writes a kept record again."""
        if self._pg is None or fields.get("ts") is None:
            return None
        also = fields.get("also")
        row = normalise(kind, {k: v for k, v in fields.items() if k != "also"})
        seq = self.written_as(row["ts_us"], body_hash(row))
        if seq is not None and also is not None:
            me = Pending(row, also)
            me.seq = seq
            self._write_also(me)
        return seq

    @staticmethod
    def fingerprint(kind: str, fields: dict[str, Any]) -> tuple[int, str]:
        """(ts_us, body hash) of the record `fields` make: all `written_as` needs to find it (no text kept)."""
        row = normalise(kind, {k: v for k, v in fields.items() if k != "also"})
        return row["ts_us"], body_hash(row)

    def written_as(self, ts_us: int, body: str) -> int | None:
        """The seq of the record of time `ts_us` and body hash `body` in the chain, or None (None on SQLite)."""
        if self._pg is None:
            return None
        with self._lock:  # a lost append still running on the server is ended first (`PgAppender.stop_lost`)
            try:
                self._pg.stop_lost()
            except psycopg_error() as e:
                raise AuditUnavailable(first_line(e)) from None
        with self.engine.connect() as c:  # ts_us is indexed (ix_audit_records_ts)
            found = c.execute(sa.select(records).where(records.c.ts_us == ts_us)).all()
        return next((r.seq for r in found if body_hash(r._asdict()) == body), None)

    def _write_also(self, me: Pending) -> None:
        """What goes with written record `me` when its transaction did not take it (PostgreSQL, or it failed there)."""
        if me.also is None:
            return
        try:
            with self.engine.begin() as c:
                me.also(c)
        except Exception:
            log.exception("could not write what goes with audit record %d", me.seq)

    def _flush(self, batch: list[Pending]) -> None:
        """Write `batch` in one transaction (under `_lock`); each waiter gets its seq or the error.

        PostgreSQL, `sign_every = 1`: once the batch has committed its records are in the chain, so a failure of
        the signature after it does not fail its waiters (their answers are served as their records say: a 503
        under a record saying 200 was a false record, and a stream's record kept by `serve.late` was written
        twice). The head is then owed (`_owed`): the log counts as unavailable, and nothing is appended until a
        head naming those records is signed, which first checks they are still in the chain."""
        unsigned = None  # why the head after the committed batch could not be signed
        try:
            try:
                if self._owed is not None:  # records served before their head: signed (still there?) before any other
                    owed_row = self._sign()
                    if owed_row is not None:
                        self._write_head_file(owed_row)
                rows = [w.row for w in batch]
                head_row = self._append_locked(rows, batch)
                if head_row is None and self._pg is not None and self._sign_due(rows[-1]["seq"]):
                    try:
                        head_row = self._sign_after(rows[-1]["seq"], rows[-1]["hash"])
                    except AuditUnavailable:  # a tampered log: the records may be gone; the writer stops
                        raise
                    except Exception as e:  # noqa: BLE001 - committed: whatever failed, the records are written
                        if not isinstance(e, (DBAPIError, OSError)):
                            log.exception("signing the audit head failed")
                        unsigned = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            except RecordRefused:
                raise
            except AuditUnavailable as e:
                self._mark_failed(str(e))
                raise
            except (DBAPIError, OSError) as e:
                self._mark_failed(f"{type(e).__name__}: {str(e).splitlines()[0]}")
                raise AuditUnavailable(f"audit log cannot be written: {self.failure}") from None
            except Exception as e:  # unforeseen: every waiter of the batch still gets an answer (a 503)
                log.exception("audit append failed")
                self._mark_failed(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
                raise AuditUnavailable(f"audit log cannot be written: {self.failure}") from None
        except RecordRefused as e:
            if len(batch) > 1:  # one record the database refuses must not cost the batch's other requests theirs
                for w in batch:
                    self._flush([w])
                return
            log.error(
                "audit record refused by the database (its request gets a 503, or a stream already sent goes unrecorded): %s", e
            )
            batch[0].error, batch[0].done = e, True
            return
        except AuditUnavailable as e:
            for w in batch:
                w.error, w.done = e, True
            return
        if unsigned is None:
            self._healthy, self.failure, self._probed_at = True, None, time.monotonic()
        else:
            last = batch[-1].row
            self._owed = (last["seq"], last["hash"])
            log.error(
                "audit records %d-%d are written and their requests served, but the head naming them could not be "
                "signed (%s): record %d's hash is %s; nothing more is appended until that head is signed",
                batch[0].row["seq"],
                last["seq"],
                unsigned,
                last["seq"],
                last["hash"],
            )
            self._mark_failed(f"the audit head after record {last['seq']} could not be signed: {unsigned}")
        for w in batch:
            w.seq, w.done = w.row["seq"], True
        self._left_unsigned(batch[-1].seq)
        if head_row is not None:
            self._write_head_file(head_row)

    def _append_locked(self, rows: list[dict[str, Any]], batch: list[Pending] = ()) -> dict[str, Any] | None:
        """Write `rows`; on SQLite also their `batch`'s `also`s and the head when due, in the same
        transaction (the new head row or None)."""
        if self._pg is not None:
            mine = self._last_head()
            if self._first_seen is None and (mine is None or mine.restored):  # once: the chain this writer appends to
                from .heads import _first

                with self.engine.connect() as c:
                    self._first_seen = _first(c, 1)[0]
            try:
                self._pg.append(rows)
                self._last_seq = rows[-1]["seq"]
            except Tampered:
                raise AuditUnavailable(
                    "audit log tampered: a record exists beyond the chain's tip (run `codemoat audit verify`)"
                ) from None
            except (psycopg_data_error(), OverflowError, ValueError) as e:
                raise RecordRefused(f"audit record refused: {first_line(e)}") from None
            except psycopg_error() as e:
                raise AuditUnavailable(first_line(e)) from None
            return None
        _ = self.signer  # load the key before taking the database's write lock
        self._last_head()  # and the head file's last head, once
        extras = [w for w in batch if w.also is not None]  # written in the records' transaction
        for attempt in range(10):
            try:
                with self.engine.begin() as c:
                    t = run(c, _LOCK_TIP).fetchone()
                    if t is None:
                        if c.execute(sa.select(records.c.seq).limit(1)).first() is not None:
                            raise AuditUnavailable(
                                "audit log tampered: records exist but the chain's tip is missing (run `codemoat audit verify`)"
                            )
                        c.execute(tip.insert().values(id=1, seq=0, hash=GENESIS))
                        t = (0, GENESIS)
                    seq, prev = t[0], t[1]
                    try:
                        for row in rows:
                            seq += 1
                            row.update(seq=seq, prev_hash=prev)
                            row["hash"] = prev = link_hash(seq, prev, body_hash(row))
                        for row in rows:
                            run(c, _INSERT_RECORDS, row)
                    except SQLITE_REFUSALS as e:  # rolled back; not a retry of the loop
                        raise RecordRefused(f"audit record refused: {first_line(e)}") from None
                    run(c, _MOVE_TIP, {"seq": seq, "hash": prev})
                    for w in extras:
                        try:
                            w.also(c)
                        except Exception as e:
                            raise AlsoFailed(e) from e
                    self._last_seq = seq
                    signed, head_row, mine = None, None, None
                    if self._sign_due(seq):
                        signed, head_row, mine = sign_tip(
                            c,
                            self.signer,
                            checkpoint_every=self.checkpoint_every,
                            min_tail=self._min_tail(),
                            head_expected=self._seen_head,
                            allowance=self.tail_allowance,
                            tip_row=(seq, prev),
                            known={r["seq"]: r["hash"] for r in rows},
                            mine=self._mine,
                        )
                self._signed(signed, head_row, mine)
                for w in extras:
                    w.also = None  # committed with the records
                return head_row
            except AlsoFailed as e:  # what goes with a record never costs the record: each is written after it, alone
                log.warning("a write that goes with an audit record failed (%s); the records are written without it", e.__cause__)
                extras = []
            except IntegrityError:
                # SQLite reads the tip before its write lock: another writer (a replica) took the
                # number, unless the tip did not move, in which case a record beyond it was put there
                with self.engine.connect() as c:
                    now = c.execute(sa.select(tip.c.seq).where(tip.c.id == 1)).scalar()
                if now == t[0]:
                    raise AuditUnavailable(
                        f"audit log tampered: record {t[0] + 1} exists beyond the chain's tip (run `codemoat audit verify`)"
                    ) from None
            except DBAPIError as e:
                if "locked" not in str(e).lower() or attempt == 9:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AuditUnavailable("audit log busy: could not append after 10 attempts")

    def close(self) -> None:
        """Write what is queued, sign what this process left unsigned and stop its threads (also run at interpreter exit)."""
        self._writer.stop()
        self._timer.stop()
        self.keeper.stop()
        try:
            if self._unsigned_since is not None:
                self.sign()
        finally:
            if self._head_copy is not None:
                self._head_copy.close()
            if self._pg is not None:
                self._pg.close()

    def _mark_failed(self, why: str) -> None:
        self._healthy, self.failure = False, why
        log.error("audit log unavailable: %s", why)

    @property
    def known_writable(self) -> bool:
        """True when a probe or an append succeeded within the last second (no I/O needed)."""
        return self._healthy and time.monotonic() - self._probed_at < 1.0

    def check_writable(self, min_free_bytes: int = 16 << 20, *, max_age: float = 1.0) -> bool:
        """Whether a record can be written now (cheap when healthy; probes the database when the last probe or
        append is `max_age` seconds old)."""
        now = time.monotonic()
        if self._healthy and now - self._probed_at < max_age:
            return True
        self._probed_at = now
        try:
            url = self.engine.url
            if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
                free = shutil.disk_usage(Path(url.database).parent).free
                if free < min_free_bytes:
                    raise AuditUnavailable(f"only {free} bytes free beside the audit database")
            if self._owed is not None:  # records served before their head: writable once it is signed (`_flush`)
                self.sign()
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
        """Move every record, checkpoint and the head into `archive` and start a new chain (`audit.rotate`)."""
        from .rotate import rotate

        return rotate(self, archive)
