"""The key server's challenge nonces, kept in the vendor database so that any key server process
behind the same database accepts a challenge another one issued.

A nonce is 32 random bytes (base64), bound to one license and an expiry in wall-clock seconds
(processes share no monotonic clock). Spending it is one `DELETE ... WHERE nonce AND license AND
expires > now` whose row count says whether it was outstanding: atomic on SQLite (one writer at a
time) and on PostgreSQL (a second DELETE of the same row waits for the first to commit, then finds
nothing), so a nonce is accepted once however many processes see it at the same moment.

Each process also remembers the last `REPLAY_MEMORY` (license, nonce) pairs it saw spent (`seen_spent`),
so a replayed request it has met before is refused with no database round trip and no signature or
attestation check; the database stays the authority across processes.

The table is bounded: every `SWEEP_EVERY` issues a process deletes the expired rows and, when more
than `MAX_NONCES` remain (a flood of challenges for a known license id), the ones that expire
first; their clients ask for a new challenge.
"""

from __future__ import annotations

import secrets
import threading
from typing import Any

import sqlalchemy as sa

from ..db import fast_execute
from .codec import b64e

MAX_NONCES = 100_000  # outstanding challenges and renewal nonces (~120 bytes a row)
SWEEP_EVERY = 256  # issues per process between sweeps of the expired rows
REPLAY_MEMORY = 65_536  # spent (license, nonce) pairs a process remembers (~200 bytes each)

_meta = sa.MetaData()
nonces_t = sa.Table(
    "vault_lease_nonces",
    _meta,
    sa.Column("nonce", sa.String(64), primary_key=True),
    sa.Column("license_id", sa.String(40)),
    sa.Column("expires", sa.Float),
)
_INSERT = sa.text("INSERT INTO vault_lease_nonces (nonce, license_id, expires) VALUES (:n, :lid, :exp)")
_SPEND = sa.text("DELETE FROM vault_lease_nonces WHERE nonce = :n AND license_id = :lid AND expires > :now")
_EXPIRE = sa.text("DELETE FROM vault_lease_nonces WHERE expires <= :now")
_COUNT = sa.text("SELECT count(*) FROM vault_lease_nonces")
_TRIM = sa.text("DELETE FROM vault_lease_nonces WHERE nonce IN (SELECT nonce FROM vault_lease_nonces ORDER BY expires LIMIT :n)")


class NonceStore:
    """Outstanding nonces in `vault_lease_nonces`; `clock.time()` dates them."""

    def __init__(self, engine: sa.Engine, clock: Any):
        self.engine, self.clock = engine, clock
        self._issued = 0
        self._lock = threading.Lock()
        self._spent: dict[tuple[str, str], None] = {}  # insertion-ordered: the oldest is forgotten first

    def issue_on(self, c: sa.Connection, license_id: str, ttl: float) -> str:
        """A fresh nonce for `license_id`, valid `ttl` seconds, written in the caller's transaction."""
        nonce = b64e(secrets.token_bytes(32))
        fast_execute(c, _INSERT, {"n": nonce, "lid": license_id, "exp": self.clock.time() + ttl})
        with self._lock:
            self._issued += 1
            due = self._issued % SWEEP_EVERY == 0
        if due:
            self._sweep(c)
        return nonce

    def issue(self, license_id: str, ttl: float) -> str:
        with self.engine.begin() as c:
            return self.issue_on(c, license_id, ttl)

    def spend_on(self, c: sa.Connection, nonce: str, license_id: str) -> bool:
        """True once for an outstanding, unexpired nonce of `license_id`; False after (or for any other).
        The caller calls `remember_spent` once its transaction has committed (a rollback leaves it live)."""
        live = fast_execute(c, _SPEND, {"n": nonce, "lid": license_id, "now": self.clock.time()}).rowcount == 1
        if not live:  # spent, expired or never issued for this license: it cannot come back
            self.remember_spent(license_id, nonce)
        return live

    def seen_spent(self, license_id: str, nonce: str) -> bool:
        """True when this process saw `nonce` spent for `license_id` (False says nothing: ask the database)."""
        return (license_id, nonce) in self._spent

    def remember_spent(self, license_id: str, nonce: str) -> None:
        with self._lock:
            self._spent[(license_id, nonce)] = None
            if len(self._spent) > REPLAY_MEMORY:
                del self._spent[next(iter(self._spent))]

    def _sweep(self, c: sa.Connection) -> None:
        c.execute(_EXPIRE, {"now": self.clock.time()})
        over = c.execute(_COUNT).scalar_one() - MAX_NONCES
        if over > 0:
            c.execute(_TRIM, {"n": over})

    def count(self) -> int:
        with self.engine.connect() as c:
            return c.execute(_COUNT).scalar_one()
