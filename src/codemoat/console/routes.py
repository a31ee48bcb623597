"""The admin console's pages at /admin (mounted by `codemoat.serve.app`): sign-in and sign-out,
Overview, Model and license, Costs here; People, Repositories and Audit in their own modules
(`routes_people`, `routes_repos`, `routes_audit`), whose routers this one includes. Reads and writes
go through the packages that own them; every request (pages and actions) is audited by the serve
trust layer like an API call, under the signed-in admin's name."""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, fields
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from ..errors import CodemoatError
from . import charts, routes_audit, routes_people, routes_repos, signin as oidc_signin
from .sessions import COOKIE, SIGNIN_COOKIE
from .web import (
    DAYS,
    HERE,
    form,
    guarded_post,
    note,
    page,
    refused,
    run,
    same_origin,
    secure,
    see_other,
    session_cookie,
    session_of,
    sessions,
    to_signin,
    usage_engine,
)

router = APIRouter(include_in_schema=False)
router.include_router(oidc_signin.router)  # "Sign in with ..." (OpenID Connect): /admin/oidc/start, /callback
router.include_router(routes_people.router)
router.include_router(routes_repos.router)
router.include_router(routes_audit.router)


# -- static, sign-in, sign-out ---------------------------------------------------------------
@router.get("/admin/static/console.css")
async def css(request: Request):
    await run(session_of, request)  # the fetch is audited under the admin's name when signed in
    return secure(FileResponse(HERE / "static" / "console.css", media_type="text/css"))


@router.get("/admin/signin")
async def signin_form(request: Request):
    value = secrets.token_urlsafe(24)
    resp = page(request, "signin.html", None, signin_csrf=value, error=None, oidc=oidc_signin.provider_name(request))
    oidc_signin.signin_cookie(resp, request, value)  # Secure over TLS
    return resp


@router.post("/admin/signin")
async def signin(request: Request):
    f = await form(request)
    cookie = request.cookies.get(SIGNIN_COOKIE)
    # bytes: compare_digest raises TypeError (a 500, before any sign-in) on a str holding a non-ASCII character
    if not same_origin(request) or not cookie or not secrets.compare_digest(cookie.encode(), f.get("csrf", "").encode()):
        return refused(request, "the sign-in form did not come from this console")
    try:
        principal = await run(request.app.state.accounts.authenticate, f.get("token", "").strip() or None)
    except CodemoatError as e:
        return _signin_again(request, str(e))
    if "admin" not in principal.scopes:
        request.state.principal = principal
        note(request, "console: sign-in refused: the token has no admin scope")
        return _signin_again(request, "this token has no admin scope: the console is for administrators")
    request.state.principal = principal
    sid, _s = await run(sessions(request).create, principal)
    note(request, "console: signed in")
    resp = see_other("/admin")
    session_cookie(resp, request, sid)
    resp.delete_cookie(SIGNIN_COOKIE, path="/admin", secure=oidc_signin.over_tls(request), httponly=True, samesite="strict")
    return resp


def _signin_again(request: Request, error: str) -> Response:
    value = secrets.token_urlsafe(24)
    resp = page(request, "signin.html", None, status=401, signin_csrf=value, error=error, oidc=oidc_signin.provider_name(request))
    oidc_signin.signin_cookie(resp, request, value)
    return resp


@router.post("/admin/signout")
async def signout(request: Request):
    s, f = await guarded_post(request)
    if s is None:
        return f
    await run(sessions(request).end, request.cookies.get(COOKIE))
    note(request, "console: signed out")
    resp = to_signin()
    resp.delete_cookie(COOKIE, path="/admin", secure=oidc_signin.over_tls(request), httponly=True, samesite="strict")
    return resp


# -- Overview ------------------------------------------------------------------------------
@router.get("/admin")
async def overview(request: Request):
    s = await run(session_of, request)
    if s is None:
        return to_signin()
    from ..usage import daily, report
    from ..usage.rollup import whole_days

    eng = usage_engine(request)
    now = time.time()
    rep = await run(report, eng, by="language", since=whole_days(DAYS, now), now=now)
    days = await run(daily, eng, DAYS, now=now)
    labels = [d.key for d in days]
    ctx = {
        "rep": rep,
        "chart_completions": charts.bars(f"Completions a day, last {DAYS} days", labels, [d.completions for d in days]),
        "chart_acceptance": charts.lines(
            f"Acceptance rate a day, last {DAYS} days (%)",
            [lab[5:] for lab in labels],
            {"acceptance %": [None if d.acceptance is None else 100 * d.acceptance for d in days]},
        ),
        "chart_tokens": charts.bars(
            "Tokens a day (prompt + completion)", labels, [d.prompt_tokens + d.completion_tokens for d in days]
        ),
    }
    return page(request, "overview.html", s, **ctx)


# -- Model and license ------------------------------------------------------------------------
@router.get("/admin/model")
async def model(request: Request):
    s = await run(session_of, request)
    if s is None:
        return to_signin()
    holder = request.app.state.holder
    st = holder.status
    engine_health: dict[str, Any] | None = None
    if holder.loaded:
        try:
            engine_health = holder.get().health()
        except Exception as e:  # the page still shows the license when the engine is away
            engine_health = {"error": f"{type(e).__name__}: {e}"}
    lic = asdict(st.license) if st.license else None
    return page(
        request,
        "model.html",
        s,
        status_=st,
        state=holder.state,
        reason=holder.reason,
        lic=lic,
        engine=engine_health,
        prompts=request.app.state.service.prompt_facts() if holder.loaded else None,
        now=time.time(),
    )


# -- Costs ---------------------------------------------------------------------------------
@router.get("/admin/costs")
async def costs(request: Request):
    s = await run(session_of, request)
    if s is None:
        return to_signin()
    from ..tco import Inputs, case

    names = [f.name for f in fields(Inputs) if f.name != "sources"]
    overrides: dict[str, float] = {}
    error = None
    for k in names:
        v = request.query_params.get(k, "").strip()
        if v:
            try:
                n = float(v)
            except ValueError:
                error = f"{k}: {v!r} is not a number"
                continue
            overrides[k] = int(n) if k in ("developers", "gpus_per_server", "months") and n.is_integer() else n
    try:
        r = await run(case, overrides, engine=usage_engine(request))
    except CodemoatError as e:  # an input out of range, or inputs whose arithmetic overflows (`tco.case`)
        error = str(e)
        r = await run(case, {}, engine=usage_engine(request))
    months = [str(m) for m in range(1, r.inputs.months + 1)]
    shown = [r.onprem, *sorted(r.alternatives, key=lambda o: -o.cumulative[-1])[:5]]
    chart = charts.lines(
        f"Cumulative cost over {r.inputs.months} months (US$)", months, {o.name: o.cumulative for o in shown}, unit="$"
    )
    return page(request, "costs.html", s, r=r, names=names, chart=chart, error=error, overrides=overrides)
