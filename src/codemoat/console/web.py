"""What every console response shares: templates that escape by default, strict security headers,
the session check, and the CSRF check on every form; the helpers every page module uses.

Headers: a CSP that allows only this server's own style sheet and images (no script at all, no
inline style, no framing: `frame-ancestors 'none'`), `X-Frame-Options: DENY`, `nosniff`,
`Referrer-Policy: same-origin`, `Cache-Control: no-store` (pages hold audit data and, once, a new
token). A POST is refused (403) without a live session, without the session's CSRF token in its
form, or with an `Origin` other than this server's own.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ..serve.usage import usage_of
from .sessions import COOKIE, SESSION_SECONDS, Session, Sessions

HERE = Path(__file__).parent
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make browsers send `Origin: null` on our own forms
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}
MAX_FORM = 64 * 1024
#: the days the pages chart and sum
DAYS = 30

env = Environment(
    loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True
)
env.filters["when"] = lambda ts: "-" if not ts else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))
env.filters["pct"] = lambda v: "-" if v is None else f"{v * 100:.1f}%"
env.filters["money"] = lambda v: "-" if v is None else (f"${v:,.0f}" if abs(v) >= 100 else f"${v:,.2f}")
env.filters["num"] = lambda v: "-" if v is None else (f"{v:,.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:,.2f}")


async def run(fn, *args, **kw):
    """`fn(*args, **kw)` in a worker thread (database reads and writes stay off the event loop)."""
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kw))


def usage_engine(request: Request):
    """The database of usage, sessions and jobs (the serve trust layer's)."""
    return request.app.state.trust.usage.engine


def secure(resp: Response) -> Response:
    for k, v in HEADERS.items():
        resp.headers[k] = v
    return resp


def sessions(request: Request) -> Sessions:
    s = getattr(request.app.state, "console_sessions", None)
    if s is None:
        s = request.app.state.console_sessions = Sessions(usage_engine(request))
    return s


def session_of(request: Request) -> Session | None:
    """The live session of this request (and its principal in `request.state`, for the audit record)."""
    s = sessions(request).get(request.cookies.get(COOKIE))
    if s is not None:
        request.state.principal = s.principal()
    return s


def same_origin(request: Request) -> bool:
    """False when the browser says the form came from another origin (a missing Origin is left to the CSRF token)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


async def form(request: Request) -> dict[str, str]:
    """An urlencoded form as {name: last value}; {} for a body past `MAX_FORM` bytes (the forms here are small). It
    was cut there: a long groups field lost its last groups, or set one cut short (another group), and the action ran."""
    body = await request.body()
    if len(body) > MAX_FORM:
        return {}
    try:
        pairs = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {k: v[-1] for k, v in pairs.items()}


def note(request: Request, text: str) -> None:
    """What a console action did, in the server's words, for the request's audit record."""
    usage_of(request.state).note = text[:300]


def page(request: Request, template: str, session: Session | None, status: int = 200, **ctx: Any) -> Response:
    from .banner import banner

    text = env.get_template(template).render(
        request=request, session=session, banner=banner(request) if session else None, nav=NAV, here=request.url.path, **ctx
    )
    return secure(HTMLResponse(text, status_code=status))


def see_other(url: str) -> Response:
    """The redirect after a form's action (303: the browser GETs `url`)."""
    return secure(RedirectResponse(url, status_code=303))


def to_signin() -> Response:
    return see_other("/admin/signin")


def refused(request: Request, why: str, status: int = 403) -> Response:
    note(request, f"console: refused: {why}")
    body = f"<!doctype html><title>Refused</title><p>Refused: {html.escape(why)}.</p>"  # `why` may quote a query
    return secure(HTMLResponse(body, status_code=status))


def session_cookie(resp: Response, request: Request, sid: str) -> None:
    # the scheme uvicorn saw: TLS to this server, or X-Forwarded-Proto from a server.trusted_proxies peer only
    secure_flag = request.url.scheme == "https"
    resp.set_cookie(COOKIE, sid, max_age=SESSION_SECONDS, path="/admin", httponly=True, samesite="strict", secure=secure_flag)


NAV = (
    ("/admin", "Overview"),
    ("/admin/people", "People"),
    ("/admin/repositories", "Repositories"),
    ("/admin/model", "Model and license"),
    ("/admin/audit", "Audit"),
    ("/admin/costs", "Costs"),
)


async def guarded_post(request: Request):
    """(session, form) for a POST that may act, or (None, response) refusing it."""
    s = await run(session_of, request)
    if s is None:
        return None, refused(request, "not signed in")
    if not same_origin(request):
        return None, refused(request, "the form came from another site")
    if len(await request.body()) > MAX_FORM:
        return None, refused(request, f"the form is larger than {MAX_FORM // 1024} KiB", 413)
    f = await form(request)
    if not s.csrf_ok(f.get("csrf")):
        return None, refused(request, "missing or wrong CSRF token")
    if any("\x00" in v for v in f.values()):  # PostgreSQL refuses one in any text it is sent: a 500 (DataError), was
        return None, refused(request, "a form field holds a NUL character", 400)
    return s, f
