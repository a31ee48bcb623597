"""Bearer-token authentication, shared by every protocol's routes."""

from __future__ import annotations

from fastapi import Request

from ..accounts import Principal
from ..errors import Forbidden


def _bearer(request: Request) -> str | None:
    h = request.headers.get("authorization", "")
    scheme, _, value = h.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or None


def require(scope: str):
    """A FastAPI dependency: the caller's principal, which must hold `scope`."""

    async def dependency(request: Request) -> Principal:
        principal = request.app.state.accounts.authenticate(_bearer(request))
        if not principal.can(scope):
            raise Forbidden(f"this token may not use {scope!r} (its scopes: {', '.join(sorted(principal.scopes))})")
        request.state.principal = principal
        check = getattr(request.app.state, "check_quota", None)
        if check is not None:
            check(request, principal)
        return principal

    return dependency
