"""The directory in a running server: the periodic sync, the fail-closed gate on every token,
`POST /auth/login`, where `codemoat login` trades a directory password for an API token, and
`GET /auth/oidc/start` + `/auth/oidc/callback`, the OpenID Connect browser sign-in (bound to the
browser that started it by a cookie, against login CSRF), and `POST /auth/device/start` +
`/auth/device/poll`, the device authorization grant (RFC 8628) behind `codemoat login` without a
password; those two answer errors in OAuth's shape (`{"error": "slow_down", ...}`, RFC 8628 §3.5).

Installed by `create_app` only when `directory.ldap_url` or `directory.oidc_issuer` is set. Sign-in failures are counted per
user: after `MAX_FAILURES` within `FAILURE_WINDOW_S` that user is refused (429) for the rest of the
window, so a password cannot be guessed through this route at the directory's speed. The user is
the one the directory found (however the name was spelled), and each try counts before its password
is checked (tries sent together cannot all pass); a name that finds no one counts as typed.
"""

from __future__ import annotations

import threading
import time
import unicodedata
from collections import deque

import secrets
from urllib.parse import parse_qs

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel, Field

from ..errors import CodemoatError, NotFound, RateLimited, Unauthorized

MAX_FAILURES, FAILURE_WINDOW_S = 5, 300
BINDING_COOKIE, BINDING_PATH = "codemoat_oidc_api", "/auth/oidc"

router = APIRouter()


class LoginRequest(BaseModel):
    username: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=1024)
    name: str | None = Field(None, max_length=128)


class _Failures:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, deque[float]] = {}
        self._prune_at = 1024

    @staticmethod
    def key(user: str) -> str:
        return " ".join(unicodedata.normalize("NFKC", user).casefold().split())

    def check(self, user: str) -> None:
        now = time.monotonic()
        with self._lock:
            w = self._seen.get(self.key(user))
            while w and w[0] < now - FAILURE_WINDOW_S:
                w.popleft()
            if w and len(w) >= MAX_FAILURES:
                raise RateLimited(
                    f"too many failed sign-ins for this user; try again in {int(w[0] + FAILURE_WINDOW_S - now) + 1} s",
                    w[0] + FAILURE_WINDOW_S - now,
                )

    def failed(self, user: str) -> None:
        with self._lock:
            self._seen.setdefault(self.key(user), deque()).append(time.monotonic())
            self._prune()

    def attempt(self, user: str) -> tuple[str, float]:
        """Check and count a password try at once, before it is made (so many tries sent together
        cannot all pass the check before the first fails); `forgive` takes it back if it succeeds."""
        k, now = self.key(user), time.monotonic()
        self.check(user)
        with self._lock:
            w = self._seen.setdefault(k, deque())
            if len(w) >= MAX_FAILURES:  # another try got in between
                raise RateLimited("too many failed sign-ins for this user; try again later", FAILURE_WINDOW_S)
            w.append(now)
            self._prune()
        return k, now

    def forgive(self, mark: tuple[str, float]) -> None:
        with self._lock:
            try:
                self._seen.get(mark[0], deque()).remove(mark[1])
            except ValueError:
                pass

    def _prune(self) -> None:
        """Forget names with no failure inside the window, once the map has doubled (many made-up names)."""
        if len(self._seen) < self._prune_at:
            return
        cutoff = time.monotonic() - FAILURE_WINDOW_S
        self._seen = {k: w for k, w in self._seen.items() if w and w[-1] >= cutoff}
        self._prune_at = max(1024, 2 * len(self._seen))


#: a sign-in is a few hundred bytes; anyone may send one, so a bigger body is refused before it is parsed
#: (the server's limit, 8 MiB of tiny JSON values, took about half a second of the event loop to parse)
MAX_LOGIN_BODY = 16 * 1024


@router.post(
    "/auth/login", openapi_extra={"requestBody": {"content": {"application/json": {"schema": LoginRequest.model_json_schema()}}}}
)
async def login(request: Request):
    """A directory user's own token (shown once): `codemoat login --server URL --user NAME`."""
    from .limits import BodyTooLarge

    raw = await request.body()
    if len(raw) > MAX_LOGIN_BODY:
        raise BodyTooLarge(f"a sign-in body is at most {MAX_LOGIN_BODY:,} bytes")
    body = LoginRequest.model_validate_json(raw)  # not JSON, or not these fields: a 400 (serve.errors)
    keeper = request.app.state.directory
    failures: _Failures = request.app.state.login_failures
    failures.check(body.username)
    # counted under the directory's name for whoever the typed name found (`bob`, ` bob`, `ＢＯＢ` are
    # one user), before the password is tried; taken back unless the directory said "wrong"
    marks: list[tuple[str, float]] = []
    try:
        secret, info = await anyio.to_thread.run_sync(
            keeper.login, body.username, body.password, body.name, lambda name: marks.append(failures.attempt(name))
        )
    except Unauthorized:
        if not marks:  # no such user: counted under the name as typed
            failures.failed(body.username)
        raise
    except BaseException:
        for m in marks:
            failures.forgive(m)
        raise
    for m in marks:
        failures.forgive(m)
    request.state.principal = request.app.state.accounts.authenticate(secret)  # audited as the user it now is
    # a bearer token in the answer: no proxy or client cache keeps it (as the OIDC and device answers)
    return JSONResponse({"token": secret, **info}, headers={"Cache-Control": "no-store"})


@router.get("/auth/oidc/start")
async def oidc_start(request: Request):
    """Send the browser to the company's OpenID provider (authorization code flow with PKCE)."""
    keeper = request.app.state.directory
    if keeper.oidc is None:
        raise NotFound("OpenID Connect sign-in is not configured on this server")
    binding = secrets.token_urlsafe(32)
    url = await anyio.to_thread.run_sync(keeper.oidc.start, "api", binding, request.client and request.client.host)
    resp = RedirectResponse(url, status_code=302)
    # the scheme uvicorn saw: TLS to this server, or X-Forwarded-Proto from a server.trusted_proxies peer only
    https = request.url.scheme == "https"
    resp.set_cookie(BINDING_COOKIE, binding, max_age=600, path=BINDING_PATH, httponly=True, samesite="lax", secure=https)
    return resp


@router.get("/auth/oidc/callback")
async def oidc_callback(request: Request, state: str = "", code: str = "", error: str = ""):
    """The provider's answer: a checked ID token becomes the user's own API token (shown once)."""
    keeper = request.app.state.directory
    if keeper.oidc is None:
        raise NotFound("OpenID Connect sign-in is not configured on this server")
    if error:
        raise Unauthorized(f"sign-in refused by the provider: {error[:100]}")
    secret, info = await anyio.to_thread.run_sync(keeper.login_oidc, state, code, request.cookies.get(BINDING_COOKIE))
    request.state.principal = request.app.state.accounts.authenticate(secret)
    resp = JSONResponse({"token": secret, **info}, headers={"Cache-Control": "no-store"})
    resp.delete_cookie(BINDING_COOKIE, path=BINDING_PATH)
    return resp


def _oauth_error(code: str, message: str, status: int = 400, **extra) -> JSONResponse:
    return JSONResponse(
        {"error": code, "error_description": message, **extra}, status_code=status, headers={"Cache-Control": "no-store"}
    )


@router.post("/auth/device/start")
async def device_start(request: Request):
    """A user code for `codemoat login` (RFC 8628 §3.2), or where to sign in instead when the provider has none."""
    keeper = request.app.state.directory
    base = str(request.base_url).rstrip("/")
    if keeper.device is None:
        return _oauth_error("device_flow_unsupported", "no OpenID provider is configured on this server", 404)
    name = _field(await request.body(), "name")
    if name:  # checked now, not after the developer approved the code (the token is minted then)
        from ..accounts.store import _check_name

        try:
            _check_name("token", name)
        except CodemoatError as e:
            return _oauth_error("invalid_request", str(e))
    try:
        st = await anyio.to_thread.run_sync(keeper.device.start, name or None, request.client and request.client.host)
    except CodemoatError as e:
        if getattr(e, "code", "") == "device_flow_unsupported":
            return _oauth_error(e.code, str(e), 404, signin_url=base + "/auth/oidc/start")
        if isinstance(e, RateLimited):
            return _oauth_error("slow_down", str(e), 429)
        return _oauth_error("server_error", str(e), e.status if e.status >= 500 else 400)
    return JSONResponse(
        {
            "device_code": st.device_code,
            "user_code": st.user_code,
            "verification_uri": st.verification_uri,
            "verification_uri_complete": st.verification_uri_complete,
            "expires_in": st.expires_in,
            "interval": st.interval,
            "server": base,
            "issuer": keeper.oidc.issuer,
        },
        headers={"Cache-Control": "no-store"},
    )


@router.post("/auth/device/poll")
async def device_poll(request: Request):
    """Poll with `device_code` (form or JSON): the developer's own token once the provider said yes."""
    from ..directory.device import DeviceError

    keeper = request.app.state.directory
    if keeper.device is None:
        return _oauth_error("device_flow_unsupported", "no OpenID provider is configured on this server", 404)
    code = _field(await request.body(), "device_code") or ""
    try:
        secret, info = await anyio.to_thread.run_sync(keeper.login_device, code)
    except DeviceError as e:
        return _oauth_error(e.code, str(e))
    except CodemoatError as e:
        return _oauth_error("access_denied" if e.status == 401 else "server_error", str(e), 400 if e.status < 500 else e.status)
    request.state.principal = request.app.state.accounts.authenticate(secret)
    return JSONResponse({"token": secret, **info}, headers={"Cache-Control": "no-store"})


def _field(body: bytes, name: str) -> str | None:
    """One field of a small form-encoded (RFC 6749 style) or JSON body."""
    body = body[:8192]
    if body.lstrip().startswith(b"{"):
        import json

        try:
            v = json.loads(body).get(name)
        except (ValueError, AttributeError, RecursionError):  # nested past the decoder's limit: not JSON either
            return None
        return v if isinstance(v, str) else None
    try:
        v = parse_qs(body.decode("utf-8"), max_num_fields=20).get(name)
    except (UnicodeDecodeError, ValueError):
        return None
    return v[-1] if v else None


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
