"""Appending to the audit chain on PostgreSQL in one network flush, the chain linked inside the database.

Every replica appends to one chain, so appends take turns on the chain's tip; what limits appends
per second is how long the tip is held. When the writer linked records itself it had to read the
tip, hash and sign, and write back, holding the tip's row lock across a network round trip (and a
writer descheduled while holding it stalled every replica: 205 appends/s from four single-threaded
writers). Now the trigger `audit_chain` (migrations/b003_audit_tip.py) numbers and links each
record in the INSERT itself; the writer sends the records with their body hashes
(`audit.chain.body_hash`) in one multi-row INSERT … RETURNING on a connection in autocommit: one
statement, one transaction, one network round trip, and reads back each record's seq and hash
(checked by recomputing the link). The tip's lock is held from the INSERT to its commit inside the
server. Signing is separate and batched (`audit.heads`).

A connection that fails (a server restart since the last append, a cut network) is replaced; whether the lost
flush committed is then read back (records with the same time and body hash), so a retry neither
loses nor doubles a record. The lost connection's server process is ended first (`_stop`, known by its pid and
start time): a cut network does not stop a statement waiting on the tip's lock, which would commit after the
read-back found nothing, beside the retry (the record twice). Needs PostgreSQL 14 (`pg_terminate_backend` with a
wait) and a direct connection: behind a pooler (PgBouncer) the pid is the pooler's, and nothing is ended.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from .chain import BODY_FIELDS, body_hash, link_hash, records

#: seconds an append's statement may run on PostgreSQL (its lock wait included) before the server cancels it
STATEMENT_TIMEOUT_S = 30.0
_COLS = (*BODY_FIELDS, "hash")
_ROW = "({})".format(",".join(["%s"] * len(_COLS)))
_INSERT = "INSERT INTO audit_records ({}) VALUES ".format(",".join(f'"{c}"' for c in _COLS))
_RETURNING = " RETURNING seq, prev_hash, hash"


class Tampered(Exception):
    """A record sits where the next append must go, beyond the chain's tip (`UniqueViolation`)."""


class PgAppender:
    """One writer's connection to the chain on PostgreSQL (not thread-safe: the log's lock serialises it)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._raw: Any = None  # a DBAPI connection taken from the pool and detached from it
        self._conn: Any = None  # its psycopg connection
        self._ident: tuple[int, Any] | None = None  # its server process: (pid, backend_start)
        # lost connections' processes not ended yet (the server was unreachable then), with when they were lost
        self._lost: list[tuple[tuple[int, Any], float]] = []

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._raw = self._conn = None

    def _discard(self) -> None:
        self.close()  # a broken connection: the next append opens another

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Write `rows` (normalised records) in one statement; fills in each row's seq, prev_hash and hash."""
        import psycopg

        bodies = [body_hash(r) for r in rows]
        sql = _INSERT + ",".join([_ROW] * len(rows)) + _RETURNING
        params = [v for r, b in zip(rows, bodies) for v in (*(r[c] for c in BODY_FIELDS), b)]
        self.stop_lost()
        for attempt in (0, 1):
            if self._raw is None:
                raw = self.engine.raw_connection()  # pre-pinged by the pool
                conn = raw.driver_connection
                raw.detach()  # ours alone from now on (autocommit), closed rather than pooled
                conn.autocommit = True
                # a statement whose connection was lost stops on the server by then at the latest (waiting on the
                # tip's lock, a synchronous standby): "not in the chain" is final once that has passed (`serve.late`)
                conn.execute(f"SET statement_timeout = {int(STATEMENT_TIMEOUT_S * 1000)}")
                self._ident = conn.execute(_IDENT).fetchone()
                self._raw, self._conn = raw, conn
            conn, ident = self._conn, self._ident
            try:
                # One statement, one implicit transaction, one round trip: the rows commit together.
                got = conn.execute(sql, params).fetchall()
                _match(rows, bodies, got)
                return
            except psycopg.errors.UniqueViolation:
                raise Tampered() from None
            except psycopg.OperationalError:
                self._discard()
                try:
                    if self._committed(rows, bodies, ident):
                        return
                except Exception:
                    if ident is not None:  # ended before anything else is appended or looked up (`stop_lost`)
                        self._lost.append((ident, time.monotonic()))
                    raise
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def stop_lost(self) -> None:
        """End the server processes of lost connections that could not be ended then (the server unreachable), before
        anything is appended or looked up: a statement one of them still runs could commit after a read-back that
        found nothing (a kept stream's record, written again: the record twice). Raises while the server is away;
        forgets a process once `statement_timeout` has ended whatever it ran."""
        if not self._lost:
            return
        now = time.monotonic()
        self._lost = [(i, t) for i, t in self._lost if now - t < STATEMENT_TIMEOUT_S + STOP_WAIT_S]
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            while self._lost:
                _stop(c, self._lost[0][0])
                self._lost.pop(0)

    def _committed(self, rows: list[dict[str, Any]], bodies: list[str], lost: tuple[int, Any] | None) -> bool:
        """Whether a flush lost with its connection (server process `lost`: pid, start time) had committed (then each
        row gets its seq). That process is ended before the records are read back (`_stop`). Each statement in its
        own transaction: a snapshot taken before the process ended would miss what it committed meanwhile."""
        # raises when the server is still away: the caller's AuditUnavailable
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            if lost is not None:
                _stop(c, lost)
            found = c.execute(sa.select(records).where(records.c.ts_us.in_({r["ts_us"] for r in rows}))).all()
        taken: set[int] = set()
        for r, b in zip(rows, bodies):
            match = next((f for f in found if f.seq not in taken and body_hash(f._asdict()) == b), None)
            if match is None:
                return False
            taken.add(match.seq)
            r.update(seq=match.seq, prev_hash=match.prev_hash, hash=match.hash)
        return True


_IDENT = "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
#: seconds the server is given to end a lost connection's process before the append counts as failed
STOP_WAIT_S = 5.0


def _stop(c: sa.Connection, ident: tuple[int, Any]) -> None:
    """End our lost connection's server process (`ident`: pid and start time, so never another session that took
    its pid) if it still exists, whatever it is doing, and wait until it has: a statement it still runs (waiting
    on the tip's lock) could otherwise commit after the read-back. Raises (the append fails: AuditUnavailable) if
    it outlives `STOP_WAIT_S`. `c` is in autocommit: each look at pg_stat_activity is a fresh snapshot."""
    import psycopg

    pid, started = ident
    ours = sa.text("SELECT 1 FROM pg_stat_activity WHERE pid = :p AND backend_start = :s")
    if c.execute(ours, {"p": pid, "s": started}).first() is None:
        return
    c.execute(sa.text("SELECT pg_terminate_backend(:p, :ms)"), {"p": pid, "ms": int(STOP_WAIT_S * 1000)})
    if c.execute(ours, {"p": pid, "s": started}).first() is not None:
        raise psycopg.OperationalError(f"the lost audit connection's server process {pid} did not end")


def _match(rows: list[dict[str, Any]], bodies: list[str], got: list[Any]) -> None:
    """Give each row its seq, prev_hash and hash from RETURNING, checked by recomputing its link (the
    rows come back in the order of VALUES; were they not, each is matched to its body)."""
    left = sorted(got)
    for r, b in zip(rows, bodies):
        seq, prev, h = next((x for x in left if link_hash(x[0], x[1], b) == x[2]), (None, None, None))
        if seq is None:
            raise RuntimeError("audit append: the database returned records that do not link to what was sent")
        left.remove((seq, prev, h))
        r.update(seq=seq, prev_hash=prev, hash=h)
