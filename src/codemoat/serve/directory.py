"""The directory in a running server: the periodic sync, the fail-closed gate on every token,
`POST /auth/login`, where `codemoat login` trades a directory password for an API token, and
`GET /auth/oidc/start` + `/auth/oidc/callback`, the OpenID Connect browser sign-in.

Installed by `create_app` only when `directory.ldap_url` is set. Sign-in failures are counted per
user name: after `MAX_FAILURES` within `FAILURE_WINDOW_S` that name is refused (429) for the rest
of the window, so a password cannot be guessed through this route at the directory's speed.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel, Field

from ..errors import NotFound, RateLimited, Unauthorized

MAX_FAILURES, FAILURE_WINDOW_S = 5, 300

router = APIRouter()


class LoginRequest(BaseModel):
    username: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=1024)
    name: str | None = Field(None, max_length=128)


class _Failures:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, deque[float]] = {}

    def check(self, user: str) -> None:
        now = time.monotonic()
        with self._lock:
            w = self._seen.get(user.lower())
            while w and w[0] < now - FAILURE_WINDOW_S:
                w.popleft()
            if w and len(w) >= MAX_FAILURES:
                raise RateLimited(
                    f"too many failed sign-ins for this user; try again in {int(w[0] + FAILURE_WINDOW_S - now) + 1} s",
                    w[0] + FAILURE_WINDOW_S - now,
                )

    def failed(self, user: str) -> None:
        with self._lock:
            self._seen.setdefault(user.lower(), deque()).append(time.monotonic())


@router.post("/auth/login")
async def login(body: LoginRequest, request: Request):
    """A directory user's own token (shown once): `codemoat login --server URL --user NAME`."""
    keeper = request.app.state.directory
    failures: _Failures = request.app.state.login_failures
    failures.check(body.username)
    try:
        secret, info = await anyio.to_thread.run_sync(keeper.login, body.username, body.password, body.name)
    except Unauthorized:
        failures.failed(body.username)
        raise
    request.state.principal = request.app.state.accounts.authenticate(secret)  # audited as the user it now is
    return JSONResponse({"token": secret, **info})


@router.get("/auth/oidc/start")
async def oidc_start(request: Request):
    """Send the browser to the company's OpenID provider (authorization code flow with PKCE)."""
    keeper = request.app.state.directory
    if keeper.oidc is None:
        raise NotFound("OpenID Connect sign-in is not configured on this server")
    url = await anyio.to_thread.run_sync(keeper.oidc.start)
    return RedirectResponse(url, status_code=302)


@router.get("/auth/oidc/callback")
async def oidc_callback(request: Request, state: str = "", code: str = "", error: str = ""):
    """The provider's answer: a checked ID token becomes the user's own API token (shown once)."""
    keeper = request.app.state.directory
    if keeper.oidc is None:
        raise NotFound("OpenID Connect sign-in is not configured on this server")
    if error:
        raise Unauthorized(f"sign-in refused by the provider: {error[:100]}")
    secret, info = await anyio.to_thread.run_sync(keeper.login_oidc, state, code)
    request.state.principal = request.app.state.accounts.authenticate(secret)
    return JSONResponse({"token": secret, **info}, headers={"Cache-Control": "no-store"})


def install(app, settings) -> None:
    """Wire the directory into `app` when one is configured; start its periodic sync."""
    if not settings.directory.ldap_url and not settings.directory.oidc_issuer:
        return
    from ..directory.service import DirectoryKeeper

    trust = getattr(app.state, "trust", None)
    keeper = DirectoryKeeper(settings, app.state.accounts.engine, audit=trust.log if trust is not None else None)
    app.state.directory = keeper
    app.state.directory_gate = keeper.gate
    app.state.login_failures = _Failures()
    app.include_router(router)
    keeper.start()
