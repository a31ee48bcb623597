"""The vendor's side of revocation lists (`vault.crl`): recording revocations in the vendor database (a
revoked license's leases end with it, its seats freed), signing the CRL document that lists them all, and
telling the key server which machines are revoked. What a CRL holds, and how a machine installs and
enforces it, is `vault.crl`'s."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from ..errors import NotFound
from .codec import VaultError, b64e, canonical, sign
from .crl import DOMAIN, KIND, VERSION
from .vendor_tables import leases_t, licenses_t, revocations_t

MAX_ID = 128
MAX_REASON = 500


def _check_reason(reason: Any) -> str:
    if not isinstance(reason, str) or not 0 < len(reason) <= MAX_REASON or any(ord(ch) < 32 for ch in reason):
        raise VaultError(f"a revocation reason is one line of 1 to {MAX_REASON} characters")
    return reason


def revoke(
    vendor: Any, *, licenses: Iterable[str] = (), machines: Iterable[str] = (), reason: str, now: int | None = None
) -> int:
    """Record revocations (a license is also revoked for leases, its seats freed); the new CRL number.
    A subject already revoked is not listed twice (the number stays when nothing is new)."""
    _check_reason(reason)
    now = int(time.time()) if now is None else now
    with vendor.engine.begin() as c:
        if c.dialect.name == "postgresql":
            # Its sequence numbers are handed out at insert, not commit: without this, a CRL built while an
            # earlier number is uncommitted skips it, and the next one, with it, bears the same number.
            c.execute(sa.text(f"LOCK TABLE {revocations_t.name} IN SHARE ROW EXCLUSIVE MODE"))
        listed = {(r.kind, r.subject) for r in c.execute(sa.select(revocations_t.c.kind, revocations_t.c.subject))}
        for kind, subjects in (("license", licenses), ("machine", machines)):
            for s in subjects:
                if not isinstance(s, str) or not 0 < len(s) <= MAX_ID:
                    raise VaultError(f"a {kind} id is 1 to {MAX_ID} characters")
                if kind == "license":
                    upd = licenses_t.update().where(licenses_t.c.id == s)
                    if not c.execute(upd.values(revoked_at=sa.func.coalesce(licenses_t.c.revoked_at, now))).rowcount:
                        raise NotFound(f"no license {s}")
                    c.execute(leases_t.delete().where(leases_t.c.license_id == s))
                if (kind, s) not in listed:
                    listed.add((kind, s))
                    c.execute(revocations_t.insert().values(kind=kind, subject=s, reason=reason, revoked_at=now))
        return c.execute(sa.select(sa.func.coalesce(sa.func.max(revocations_t.c.seq), 0))).scalar_one()


def build(vendor: Any, now: int | None = None) -> dict[str, Any]:
    """The vendor's current CRL document (every revocation so far), signed."""
    with vendor.engine.connect() as c:
        rows = c.execute(sa.select(revocations_t).order_by(revocations_t.c.seq)).all()
    body = {
        "number": rows[-1].seq if rows else 0,
        "issued_at": int(time.time()) if now is None else now,
        "vendor_key": vendor.vendor_key_b64,
        "revoked": [{"kind": r.kind, "id": r.subject, "reason": r.reason, "revoked_at": r.revoked_at} for r in rows],
    }
    return {"kind": KIND, "version": VERSION, "crl": body, "signature": b64e(sign(vendor.signing_key, DOMAIN, canonical(body)))}


def revoked_machines(engine: sa.Engine, ids: Iterable[str]) -> dict[str, str]:
    """Which of these machines the vendor revoked, with the reason (the key server refuses their leases)."""
    q = sa.select(revocations_t.c.subject, revocations_t.c.reason).where(
        revocations_t.c.kind == "machine", revocations_t.c.subject.in_(list(ids))
    )
    with engine.connect() as c:
        return {r.subject: r.reason for r in c.execute(q)}
