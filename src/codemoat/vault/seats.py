"""Floating seats: how many serving processes a license's machines may run at once (`KeyServer.lease`).

A seat belongs to (license, machine, instance): each serving process names an Ed25519 key of its own
(`instance`, proven by the key server before a seat is touched), so N+1 processes on an N-seat license
leave the last one refused (`seats_exhausted`), and a process that has the machine key but not another
instance's private key can neither renew nor release that instance's seat. A seat is held until its
lease's expiry plus the license's grace (the time a process cut off from the key server may serve on),
so a crashed process's seat lapses then, and a clean shutdown gives it back at once (`release_seat`).

Every function runs inside the caller's lease transaction. An allocation first bumps the license row
(its write lock), so concurrent requests, from any key server process, cannot oversubscribe.
"""

from __future__ import annotations

import sqlalchemy as sa

from ..db import fast_execute
from .codec import LeaseDenied

# Plain SQL (portable between SQLite and PostgreSQL): a lease is a hot path, and building
# SQLAlchemy expressions per request cost more than the cryptography.
_RENEW = sa.text(
    "UPDATE vault_leases SET expires = :exp, renewed_at = :now, renewals = renewals + 1 "
    "WHERE license_id = :lid AND machine_id = :mid AND instance = :inst AND expires > :held"
)
# `:held` = now - grace: a holder may serve on that long without being heard from (a key server outage,
# or a firewall rule), so its seat is not handed to another process before then.
_COUNT_LIVE = sa.text("SELECT count(*) FROM vault_leases WHERE license_id = :lid AND expires > :held")
_COUNT_LIVE_MACHINE = sa.text(
    "SELECT count(*) FROM vault_leases WHERE license_id = :lid AND machine_id = :mid AND expires > :held"
)
_LOCK_LICENSE = sa.text("UPDATE vault_licenses SET lease_gen = lease_gen + 1 WHERE id = :lid")
_DROP_EXPIRED = sa.text("DELETE FROM vault_leases WHERE license_id = :lid AND expires <= :held")
_INSERT = sa.text(
    "INSERT INTO vault_leases (license_id, machine_id, instance, expires, renewed_at, renewals) "
    "VALUES (:lid, :mid, :inst, :exp, :now, 0)"
)
_RELEASE = sa.text("DELETE FROM vault_leases WHERE license_id = :lid AND machine_id = :mid AND instance = :inst")
_LIVE = sa.text("SELECT count(*) FROM vault_leases WHERE license_id = :lid AND expires > :now")


def take_seat(
    c: sa.Connection,
    lid: str,
    mid: str,
    inst: str,
    seats: int,
    now: float,
    ttl: int,
    grace: int,
    per_machine: int | None = None,
) -> int:
    """Renew this instance's seat or take a free one; seats in use after, or `seats_exhausted`.

    A refused request writes nothing, so a flood of made-up instances from one machine holds at most
    the license's free seats, and never one that a live instance holds; with the license's
    `max_seats_per_machine`, at most that many (`machine_seats_exhausted`), so one licensed machine
    cannot take the seats the others need."""
    p = {"lid": lid, "mid": mid, "inst": inst, "now": now, "exp": now + ttl, "held": now - max(0, grace or 0)}
    # Fast path, a renewal of a live seat: the number of seats in use does not change.
    if fast_execute(c, _RENEW, p).rowcount:
        return fast_execute(c, _COUNT_LIVE, p).fetchone()[0]
    fast_execute(c, _LOCK_LICENSE, p)  # the row's write lock: seat allocations serialise across processes
    fast_execute(c, _DROP_EXPIRED, p)  # including this instance's own lapsed seat (past its grace): it competes again
    held = fast_execute(c, _COUNT_LIVE, p).fetchone()[0]
    if held >= seats:
        raise LeaseDenied("seats_exhausted", f"all {seats} seats of license {lid} are in use", 409)
    if per_machine and fast_execute(c, _COUNT_LIVE_MACHINE, p).fetchone()[0] >= per_machine:
        raise LeaseDenied(
            "machine_seats_exhausted",
            f"machine {mid} already holds {per_machine} seats of license {lid}, the most one machine may hold",
            409,
        )
    fast_execute(c, _INSERT, p)
    return held + 1


def release_seat(c: sa.Connection, lid: str, mid: str, inst: str) -> None:
    """Release this instance's seat at once (a clean shutdown)."""
    c.execute(_RELEASE, {"lid": lid, "mid": mid, "inst": inst})


def live_seats(c: sa.Connection, lid: str, now: float) -> int:
    """Leases of the license not yet expired at `now` (the grace after them not counted)."""
    return c.execute(_LIVE, {"lid": lid, "now": now}).scalar_one()
