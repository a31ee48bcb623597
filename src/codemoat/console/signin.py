"""Console sign-in with the company's OpenID provider ("Sign in with ..." on /admin/signin).

    GET /admin/oidc/start      a fresh random value in a cookie (its SHA-256 kept with the state),
                               then the provider's authorization URL (code flow, PKCE)
    GET /admin/oidc/callback   the state consumed once, the cookie checked against it, the ID token
                               checked; an admin (mapped groups ∩ directory.admin_groups) gets a
                               session; anyone else, a refusal

Login CSRF: the cookie binds the sign-in to the browser that started it (OpenID Connect Core
§15.5.2), so a callback URL with someone else's state and code, sent to a victim or replayed from a
stolen one, signs nobody in. The cookie is `SameSite=Lax` (the provider's redirect back is a
cross-site top-level GET, which a `Strict` cookie would not join), lives 10 minutes, is scoped to
/admin/oidc and is deleted at the callback. The session cookie (`Strict`) is set only after the
callback verified; its page then moves on to /admin from this site, so the `Strict` cookie joins.
The session rests on an admin-only token of the session's length, revocable like any other.
Every cookie set here is `Secure` when the request came over TLS (`over_tls`), the sign-in form's too.
"""

from __future__ import annotations

import html
import secrets

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from ..errors import CodemoatError
from .sessions import OIDC_COOKIE, SESSION_SECONDS, SIGNIN_COOKIE
from .web import note, page, run, secure, see_other, session_cookie, sessions

router = APIRouter(include_in_schema=False)
PATH = "/admin/oidc"
BINDING_SECONDS = 600


def provider_name(request: Request) -> str | None:
    """The name on the "Sign in with ..." button, or None when no OpenID provider is configured."""
    keeper = getattr(request.app.state, "directory", None)
    if keeper is None or keeper.oidc is None:
        return None
    return keeper.cfg.oidc_display_name


def signin_cookie(resp: Response, request: Request, value: str) -> None:
    """The sign-in form's double-submit CSRF value (`codemoat_signin`): HttpOnly (the form carries its copy, no
    script reads it), `Strict` (the form is posted from this site), scoped to /admin, and `Secure` over TLS as the
    session cookie is. Without `Secure`, a browser that signed in over https sends it on a plain-http request to
    the same host, where anyone on the path reads it, and accepts one set over plain http (a cookie tossed into
    the victim's jar), which a login-CSRF then pairs with a form of the attacker's."""
    resp.set_cookie(SIGNIN_COOKIE, value, max_age=600, path="/admin", httponly=True, samesite="strict", secure=over_tls(request))


def _again(request: Request, error: str, status: int = 401) -> Response:
    value = secrets.token_urlsafe(24)
    resp = page(request, "signin.html", None, status=status, signin_csrf=value, error=error, oidc=provider_name(request))
    signin_cookie(resp, request, value)
    resp.delete_cookie(OIDC_COOKIE, path=PATH, secure=over_tls(request), httponly=True, samesite="lax")
    return resp


def over_tls(request: Request) -> bool:
    # the scheme uvicorn saw: TLS to this server, or X-Forwarded-Proto from a server.trusted_proxies peer only
    return request.url.scheme == "https"


@router.get(PATH + "/start")
async def start(request: Request):
    keeper = getattr(request.app.state, "directory", None)
    if keeper is None or keeper.oidc is None:
        return _again(request, "sign-in with an OpenID provider is not configured on this server", 404)
    binding = secrets.token_urlsafe(32)
    try:
        url = await run(keeper.oidc.start, "console", binding, request.client and request.client.host)
    except CodemoatError as e:
        return _again(request, str(e), 429 if e.status == 429 else 503)
    note(request, "console: sign-in with the OpenID provider started")
    resp = see_other(url)
    resp.set_cookie(
        OIDC_COOKIE, binding, max_age=BINDING_SECONDS, path=PATH, httponly=True, samesite="lax", secure=over_tls(request)
    )
    return resp


@router.get(PATH + "/callback")
async def callback(request: Request, state: str = "", code: str = "", error: str = ""):
    keeper = getattr(request.app.state, "directory", None)
    if keeper is None or keeper.oidc is None:
        return _again(request, "sign-in with an OpenID provider is not configured on this server", 404)
    if error:
        note(request, f"console: sign-in refused by the provider: {error[:100]}")
        return _again(request, f"sign-in refused by the provider: {error[:100]}")
    binding = request.cookies.get(OIDC_COOKIE)
    try:
        secret, info = await run(keeper.console_signin, state[:256], code[:2048], binding, SESSION_SECONDS)
        principal = await run(request.app.state.accounts.authenticate, secret)
    except CodemoatError as e:
        note(request, f"console: sign-in refused: {e}")
        return _again(request, str(e), 503 if e.status >= 500 else 401)
    del secret  # the token backs the session only; nobody sees it
    request.state.principal = principal
    sid, _s = await run(sessions(request).create, principal)
    note(request, "console: signed in with the OpenID provider")
    who = html.escape(info["user"])
    # A page, not a redirect: the browser arrived here from the provider's site, and a redirect would
    # keep that cross-site context, so the Strict session cookie would stay behind on /admin.
    resp = secure(
        HTMLResponse(
            '<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0;url=/admin">'
            f'<title>Signed in</title><p>Signed in as {who}. <a href="/admin" id="continue">Continue to the console</a>.</p>'
        )
    )
    session_cookie(resp, request, sid)
    resp.delete_cookie(OIDC_COOKIE, path=PATH, secure=over_tls(request), httponly=True, samesite="lax")
    resp.delete_cookie(SIGNIN_COOKIE, path="/admin", secure=over_tls(request), httponly=True, samesite="strict")
    return resp
