"""The banner every console page shows when the license needs attention: it expires within 30 days,
or its key lease is renewing (the key server did not answer the last renewal) or lost."""

from __future__ import annotations

from fastapi import Request

WARN_DAYS = 30


def banner(request: Request) -> str | None:
    holder = getattr(request.app.state, "holder", None)
    lic = holder.status.license if holder is not None else None
    if lic is None:
        return None
    parts = []
    left = lic.seconds_until_expiry
    if left is not None and left < WARN_DAYS * 86400:
        parts.append(
            "the license has expired" if left <= 0 else f"the license expires in {left / 86400:.0f} days ({lic.license_expires})"
        )
    if lic.lease_state in ("renewing", "lost", "revoked"):
        grace = f", {lic.lease_seconds_left:.0f} s of key lease left" if lic.lease_seconds_left is not None else ""
        parts.append(
            f"the key lease is {lic.lease_state}{grace}"
            + (f" (last error: {lic.lease_last_error})" if lic.lease_last_error else "")
        )
    text = "; ".join(parts)
    return text[:1].upper() + text[1:] if text else None
