"""Appending to the audit chain on PostgreSQL in one network flush, the chain linked inside the database.

Every replica appends to one chain, so appends take turns on the chain's tip; what limits appends
per second is how long the tip is held. When the writer linked records itself it had to read the
tip, hash and sign, and write back, holding the tip's row lock across a network round trip (and a
writer descheduled while holding it stalled every replica: 205 appends/s from four single-threaded
writers). Now the trigger `audit_chain` (migrations/b003_audit_tip.py) numbers and links each
record in the INSERT itself; the writer sends the records with their body hashes
(`audit.chain.body_hash`) and the COMMIT in one flush (psycopg pipeline mode, PostgreSQL docs
§55.2.4) and reads back each record's seq and hash. The tip's lock is held from the INSERT to the
COMMIT inside the server. Signing is separate and batched (`audit.heads`).

A connection that fails (a server restart since the last append) is replaced; whether the lost
flush committed is then read back (records with the same time and body hash), so a retry neither
loses nor doubles a record.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from .chain import BODY_FIELDS, body_hash, records

_COLS = (*BODY_FIELDS, "hash")
_INSERT_RECORD = "INSERT INTO audit_records ({}) VALUES ({}) RETURNING seq, prev_hash, hash".format(
    ",".join(f'"{c}"' for c in _COLS), ",".join(["%s"] * len(_COLS))
)


class Tampered(Exception):
    """A record sits where the next append must go, beyond the chain's tip (`UniqueViolation`)."""


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

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Write `rows` (normalised records) in one transaction; fills in each row's seq, prev_hash and hash."""
        import psycopg

        bodies = [body_hash(r) for r in rows]
        for attempt in (0, 1):
            if self._raw is None:
                self._raw = self.engine.raw_connection()  # pre-pinged by the pool
            conn = self._raw.driver_connection
            try:
                with conn.pipeline(), conn.cursor() as cur:
                    cur.executemany(
                        _INSERT_RECORD, [(*(r[c] for c in BODY_FIELDS), b) for r, b in zip(rows, bodies)], returning=True
                    )
                    conn.commit()
                    got = []
                    while True:
                        got.append(cur.fetchone())
                        if not cur.nextset():
                            break
                for r, (seq, prev, h) in zip(rows, got):
                    r.update(seq=seq, prev_hash=prev, hash=h)
                return
            except psycopg.errors.UniqueViolation:
                conn.rollback()
                raise Tampered() from None
            except psycopg.OperationalError:
                self._discard()
                if self._committed(rows, bodies):
                    return
                if attempt == 1:
                    raise
            except BaseException:
                if not conn.closed:
                    conn.rollback()
                raise
        raise AssertionError("unreachable")

    def _committed(self, rows: list[dict[str, Any]], bodies: list[str]) -> bool:
        """Whether a flush lost with its connection had committed (then each row gets its seq)."""
        with self.engine.connect() as c:  # raises when the server is still away: the caller's AuditUnavailable
            found = c.execute(sa.select(records).where(records.c.ts_us.in_({r["ts_us"] for r in rows}))).all()
        taken: set[int] = set()
        for r, b in zip(rows, bodies):
            match = next((f for f in found if f.seq not in taken and body_hash(f._asdict()) == b), None)
            if match is None:
                return False
            taken.add(match.seq)
            r.update(seq=match.seq, prev_hash=match.prev_hash, hash=match.hash)
        return True
