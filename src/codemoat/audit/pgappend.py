"""Appending to the audit chain on PostgreSQL in two network flushes, one while the head is locked.

Every append locks the head row, so replicas write one chain; what limits appends per second is how
long that lock is held. Through SQLAlchemy each append was: a pool pre-ping, BEGIN, the locking
SELECT, the INSERT, the head UPDATE and COMMIT, six round trips, the last three with the lock held
(and a writer descheduled while holding it stalls every other replica). Here the writer keeps one
connection and uses psycopg's pipeline mode (the extended query protocol's Sync points, PostgreSQL
docs §55.2.4): BEGIN and `SELECT … FOR UPDATE` leave in one flush; the records, checkpoints, the
head and COMMIT in the next. The lock is held for one round trip plus the hashing and the one
Ed25519 signature in between. The records are chained and signed exactly as before (`audit.chain`):
a verifier cannot tell which path wrote them.

A connection that fails before anything was sent in a transaction (a server restart since the
last append) is replaced and the append tried once more; a failure after that is the caller's
`AuditUnavailable`, since the commit may or may not have happened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from .chain import FIELDS

_COLS = (*FIELDS, "hash")
_INSERT_RECORD = "INSERT INTO audit_records ({}) VALUES ({})".format(
    ",".join(f'"{c}"' for c in _COLS), ",".join(["%s"] * len(_COLS))
)
_HEAD_COLS = ("seq", "hash", "last_checkpoint", "ts_us", "key_id", "signature")
_CP_COLS = ("seq", "hash", "prev_checkpoint", "ts_us", "reason", "key_id", "signature")
_INSERT_CP = "INSERT INTO audit_checkpoints ({}) VALUES ({})".format(",".join(_CP_COLS), ",".join(["%s"] * len(_CP_COLS)))
_LOCK_HEAD = "SELECT seq, hash, last_checkpoint FROM audit_head WHERE id = 1 FOR UPDATE"
_UPDATE_HEAD = "UPDATE audit_head SET {} WHERE id = 1".format(",".join(f"{c} = %s" for c in _HEAD_COLS))
_INSERT_HEAD = "INSERT INTO audit_head (id, {}) VALUES (1, {})".format(",".join(_HEAD_COLS), ",".join(["%s"] * len(_HEAD_COLS)))
_COUNT = "SELECT count(*) FROM audit_records"

# What `chain` gets: (seq, hash, last_checkpoint) of the locked head, or None for an empty log;
# what it returns: the chained record rows, the signed checkpoint rows, and the signed head row.
Chain = Callable[[Any, bool], tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]]


class Tampered(Exception):
    """A record sits where the next append must go although the head did not move (`UniqueViolation`)."""


class PgAppender:
    """One writer's connection to the chain on PostgreSQL (not thread-safe: the log's lock serialises it)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._raw: Any = None  # a pooled DBAPI connection, kept checked out between appends

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def _discard(self) -> None:
        if self._raw is not None:
            self._raw.invalidate()
            self._raw = None

    def append(self, chain: Chain) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Lock the head, let `chain(head, records_exist)` build the rows, write them and commit."""
        import psycopg

        for attempt in (0, 1):
            if self._raw is None:
                self._raw = self.engine.raw_connection()  # pre-pinged by the pool
            conn = self._raw.driver_connection
            sent = False
            try:
                with conn.pipeline() as p, conn.cursor() as cur:
                    cur.execute(_LOCK_HEAD)
                    p.sync()
                    h = cur.fetchone()
                    sent = True
                    exist = False
                    if h is None:
                        cur.execute(_COUNT)
                        p.sync()
                        exist = bool(cur.fetchone()[0])
                    rows, cps, head_row = chain(h, exist)
                    cur.executemany(_INSERT_RECORD, [tuple(r[c] for c in _COLS) for r in rows])
                    if cps:
                        cur.executemany(_INSERT_CP, [tuple(c[k] for k in _CP_COLS) for c in cps])
                    cur.execute(_INSERT_HEAD if h is None else _UPDATE_HEAD, tuple(head_row[c] for c in _HEAD_COLS))
                    conn.commit()
                return rows, head_row
            except psycopg.errors.UniqueViolation:
                conn.rollback()
                raise Tampered() from None
            except psycopg.OperationalError:
                self._discard()
                if sent or attempt == 1:
                    raise
            except BaseException:
                if not conn.closed:
                    conn.rollback()
                raise
        raise AssertionError("unreachable")
