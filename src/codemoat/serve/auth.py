"""Bearer-token authentication, shared by every protocol's routes and by the secret screen.

A token comes as `Authorization: Bearer <token>` (OpenAI, Tabby, Continue's Ollama provider) or
`x-api-key` (Anthropic-style clients). A request is authenticated at most once: the first check
(the secret screen's, or a route's dependency) leaves the principal in `request.state`.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import Request
from starlette.datastructures import Headers

from ..accounts import Principal
from ..errors import CodemoatError, Forbidden


def bearer(headers: Mapping[str, str]) -> str | None:
    """The token a request carries (header names lower-case, as Starlette's `Headers` gives them)."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key") or None


def principal_of(scope) -> Principal | None:
    """The principal of a raw ASGI request's token, or None (no token, or not a valid one): for the
    layers in front of the routes (the secret screen, the audit record of a request no route saw)."""
    app = scope.get("app")
    accounts = getattr(app.state, "accounts", None) if app is not None else None
    secret = bearer(Headers(scope=scope))
    if not secret or accounts is None:
        return None
    try:
        return accounts.authenticate(secret)
    except CodemoatError:
        return None


def authenticate(request: Request) -> Principal:
    """The caller's principal, or `Unauthorized` (401); remembered for the rest of the request."""
    principal = getattr(request.state, "principal", None)
    if principal is None:
        principal = request.app.state.accounts.authenticate(bearer(request.headers))
        gate = getattr(request.app.state, "directory_gate", None)
        if gate is not None:  # a directory user, while the directory has been unreachable too long: refused
            gate(principal)
        request.state.principal = principal
    return principal


def require(scope: str, *, quota: bool = True):
    """A FastAPI dependency: the caller's principal, which must hold `scope`; with `quota`, the
    request counts against the caller's quotas (429 past them)."""

    async def dependency(request: Request) -> Principal:
        principal = authenticate(request)
        if not principal.can(scope):
            raise Forbidden(f"this token may not use {scope!r} (its scopes: {', '.join(sorted(principal.scopes))})")
        check = getattr(request.app.state, "check_quota", None)
        if quota and check is not None:
            check(request, principal)
        return principal

    return dependency


async def any_token(request: Request) -> Principal:
    """A FastAPI dependency for status routes: any valid token, whatever its scopes, no quota."""
    return authenticate(request)
