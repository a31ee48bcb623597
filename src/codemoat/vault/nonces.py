"""The key server's challenge nonces: stateless, so asking for a challenge writes nothing.

A nonce is base64 of 48 bytes, 64 characters (`VERSION` 1 byte, its expiry as a big-endian IEEE double of
wall-clock seconds, 15 random bytes, then a 24-byte HMAC-SHA256 tag over `MAC_DOMAIN`, those 24 bytes and
the license id). The MAC key is HKDF-SHA256 over the key server's Ed25519 private key, which every key
server process of a vendor holds already (clients pin its public key), so any of them checks a nonce
another issued, and a restart forgets none. Keeping outstanding nonces in a table instead let anyone who
knows a license id (it is printed on the license) ask for challenges in a loop until the table's cap
evicted every genuine client's pending nonce: its renewals failed and, after the grace, it stopped serving.

Spending a nonce checks its encoding (the one base64 spelling of its bytes), tag, license and expiry,
then inserts it into `vault_lease_spent` (`INSERT ... ON CONFLICT DO NOTHING`, whose row count says
whether it was new): atomic on SQLite (one writer at a time) and on PostgreSQL (a second insert of the
same key waits for the first to commit, then conflicts), so a nonce is accepted once however many
processes see it at the same moment. The key server spends only after the request's signature has
verified, so the spent table grows only with genuine leases; a row is kept until `SKEW_S` after its nonce
expires (every `SWEEP_EVERY` spends a process deletes the older ones). Expiry is read on each process's own
wall clock, so a row swept the moment the sweeping host thought it expired would let a host whose clock runs
behind (another replica, or this one after NTP stepped it back) accept the nonce again: a replayed release
would free a seat. The margin keeps the row for as long as the clocks may disagree.

Each process also remembers the last `REPLAY_MEMORY` (license, nonce) pairs it saw spent (`seen_spent`),
so a replayed request it has met before is refused with no database round trip and no signature or
attestation check; the database stays the authority across processes.
"""

from __future__ import annotations

import secrets
import struct
import threading
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import constant_time, hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..db import fast_execute
from .codec import VaultError, b64d, b64e

VERSION = 1
MAC_DOMAIN = b"codemoat-lease-nonce-v1"
KEY_INFO = b"codemoat-lease-nonce-mac-v1"
_RANDOM, _TAG = 15, 24
_BODY = 1 + 8 + _RANDOM
NONCE_CHARS = 4 * (_BODY + _TAG) // 3  # 64: the spent table's key width
SWEEP_EVERY = 256  # spends per process between sweeps of the expired spent rows
SKEW_S = 3600.0  # how long a spent row outlives its nonce: the key servers' clocks may disagree this much
REPLAY_MEMORY = 65_536  # spent (license, nonce) pairs a process remembers (~200 bytes each)

_meta = sa.MetaData()
spent_t = sa.Table(
    "vault_lease_spent",
    _meta,
    sa.Column("nonce", sa.String(NONCE_CHARS), primary_key=True),
    sa.Column("expires", sa.Float),
)
_SPEND = sa.text("INSERT INTO vault_lease_spent (nonce, expires) VALUES (:n, :exp) ON CONFLICT (nonce) DO NOTHING")
_EXPIRE = sa.text("DELETE FROM vault_lease_spent WHERE expires <= :now")
_COUNT = sa.text("SELECT count(*) FROM vault_lease_spent")


def mac_key(keyserver_private: bytes) -> bytes:
    """The nonce MAC key every process of one key server derives alike from its Ed25519 private key."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KEY_INFO).derive(keyserver_private)


class NonceStore:
    """Issues self-checking nonces and records spent ones in `vault_lease_spent`; `clock.time()` dates them."""

    def __init__(self, engine: sa.Engine, clock: Any, key: bytes):
        self.engine, self.clock, self._key = engine, clock, key
        self._spends = 0
        self._lock = threading.Lock()
        self._spent: dict[tuple[str, str], None] = {}  # insertion-ordered: the oldest is forgotten first

    def _tag(self, body: bytes, license_id: str) -> bytes:
        h = hmac.HMAC(self._key, hashes.SHA256())
        h.update(MAC_DOMAIN + b"\x00" + body + license_id.encode())  # the license id last: no ambiguity
        return h.finalize()[:_TAG]

    def issue_on(self, c: sa.Connection | None, license_id: str, ttl: float) -> str:
        """A fresh nonce for `license_id`, valid `ttl` seconds. Writes nothing: `c` (the lease transaction a
        renewal's next nonce is issued in) is not used, and kept so callers need not know."""
        body = struct.pack(">Bd", VERSION, self.clock.time() + ttl) + secrets.token_bytes(_RANDOM)
        return b64e(body + self._tag(body, license_id))

    def issue(self, license_id: str, ttl: float) -> str:
        return self.issue_on(None, license_id, ttl)

    def expiry(self, nonce: str, license_id: str) -> float | None:
        """When `nonce` expires, if this key server issued it for `license_id` (version and tag); else None.
        64 base64 characters without padding are 48 bytes with no spare bits: one spelling, one spent-table key."""
        if not isinstance(nonce, str) or len(nonce) != NONCE_CHARS:
            return None
        try:
            raw = b64d(nonce, "nonce")
        except VaultError:
            return None
        if len(raw) != _BODY + _TAG or raw[0] != VERSION:
            return None
        body, tag = raw[:_BODY], raw[_BODY:]
        if not constant_time.bytes_eq(tag, self._tag(body, license_id)):
            return None
        return struct.unpack(">d", body[1:9])[0]

    def spend_on(self, c: sa.Connection, nonce: str, license_id: str) -> bool:
        """True once for a genuine, unexpired nonce of `license_id`; False after (or for any other).
        The caller calls `remember_spent` once its transaction has committed (a rollback leaves it live)."""
        now = self.clock.time()
        expires = self.expiry(nonce, license_id)
        live = expires is not None and expires > now and fast_execute(c, _SPEND, {"n": nonce, "exp": expires}).rowcount == 1
        if not live:  # spent, expired or never issued for this license: it cannot come back
            self.remember_spent(license_id, nonce)
            return False
        with self._lock:
            self._spends += 1
            due = self._spends % SWEEP_EVERY == 0
        if due:
            fast_execute(c, _EXPIRE, {"now": now - SKEW_S})
        return True

    def seen_spent(self, license_id: str, nonce: str) -> bool:
        """True when this process saw `nonce` spent for `license_id` (False says nothing: ask the database)."""
        return (license_id, nonce) in self._spent

    def remember_spent(self, license_id: str, nonce: str) -> None:
        with self._lock:
            self._spent[(license_id, nonce)] = None
            if len(self._spent) > REPLAY_MEMORY:
                del self._spent[next(iter(self._spent))]

    def count(self) -> int:
        """Rows in the spent table (issuing adds none)."""
        with self.engine.connect() as c:
            return c.execute(_COUNT).scalar_one()
