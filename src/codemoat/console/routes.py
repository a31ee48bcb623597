"""The admin console's pages at /admin (mounted by `codemoat.serve.app`): sign-in and sign-out,
Overview, People, Repositories, Model and license, Audit, Costs. Reads and writes go through the
packages that own them; every request (pages and actions) is audited by the serve trust layer
like an API call, under the signed-in admin's name."""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, fields
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from ..errors import CodemoatError
from . import auditview, charts, signin as oidc_signin
from .sessions import COOKIE, SIGNIN_COOKIE
from .web import HERE, form, note, page, refused, same_origin, secure, session_cookie, session_of, sessions, to_signin

router = APIRouter(include_in_schema=False)
router.include_router(oidc_signin.router)  # "Sign in with ..." (OpenID Connect): /admin/oidc/start, /callback
DAYS = 30


async def _run(fn, *args, **kw):
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kw))


def _engine(request: Request):
    return request.app.state.trust.usage.engine


async def _guarded_post(request: Request):
    """(session, form) for a POST that may act, or (None, response) refusing it."""
    s = await _run(session_of, request)
    if s is None:
        return None, refused(request, "not signed in")
    if not same_origin(request):
        return None, refused(request, "the form came from another site")
    f = await form(request)
    if not s.csrf_ok(f.get("csrf")):
        return None, refused(request, "missing or wrong CSRF token")
    return s, f


# -- static, sign-in, sign-out ---------------------------------------------------------------
@router.get("/admin/static/console.css")
async def css(request: Request):
    await _run(session_of, request)  # the fetch is audited under the admin's name when signed in
    return secure(FileResponse(HERE / "static" / "console.css", media_type="text/css"))


@router.get("/admin/signin")
async def signin_form(request: Request):
    value = secrets.token_urlsafe(24)
    resp = page(request, "signin.html", None, signin_csrf=value, error=None, oidc=oidc_signin.provider_name(request))
    resp.set_cookie(SIGNIN_COOKIE, value, max_age=600, path="/admin", httponly=True, samesite="strict")
    return resp


@router.post("/admin/signin")
async def signin(request: Request):
    f = await form(request)
    cookie = request.cookies.get(SIGNIN_COOKIE)
    if not same_origin(request) or not cookie or not secrets.compare_digest(cookie, f.get("csrf", "")):
        return refused(request, "the sign-in form did not come from this console")
    try:
        principal = await _run(request.app.state.accounts.authenticate, f.get("token", "").strip() or None)
    except CodemoatError as e:
        return _signin_again(request, str(e))
    if "admin" not in principal.scopes:
        request.state.principal = principal
        note(request, "console: sign-in refused: the token has no admin scope")
        return _signin_again(request, "this token has no admin scope: the console is for administrators")
    request.state.principal = principal
    sid, _s = await _run(sessions(request).create, principal)
    note(request, "console: signed in")
    resp = secure(RedirectResponse("/admin", status_code=303))
    session_cookie(resp, request, sid)
    resp.delete_cookie(SIGNIN_COOKIE, path="/admin")
    return resp


def _signin_again(request: Request, error: str) -> Response:
    value = secrets.token_urlsafe(24)
    resp = page(request, "signin.html", None, status=401, signin_csrf=value, error=error, oidc=oidc_signin.provider_name(request))
    resp.set_cookie(SIGNIN_COOKIE, value, max_age=600, path="/admin", httponly=True, samesite="strict")
    return resp


@router.post("/admin/signout")
async def signout(request: Request):
    s, f = await _guarded_post(request)
    if s is None:
        return f
    await _run(sessions(request).end, request.cookies.get(COOKIE))
    note(request, "console: signed out")
    resp = to_signin()
    resp.delete_cookie(COOKIE, path="/admin")
    return resp


# -- Overview ------------------------------------------------------------------------------
@router.get("/admin")
async def overview(request: Request):
    s = await _run(session_of, request)
    if s is None:
        return to_signin()
    from ..usage import daily, report
    from ..usage.rollup import whole_days

    eng = _engine(request)
    now = time.time()
    rep = await _run(report, eng, by="language", since=whole_days(DAYS, now), now=now)
    days = await _run(daily, eng, DAYS, now=now)
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


# -- People --------------------------------------------------------------------------------
async def _people(request: Request, s, *, created: dict | None = None, error: str | None = None, status: int = 200):
    from ..accounts import ALL_SCOPES
    from ..usage import report
    from ..usage.rollup import whole_days

    acc = request.app.state.accounts
    users = await _run(acc.list_users)
    groups = await _run(acc.list_groups)
    toks = await _run(acc.list_tokens)
    from .people import disabled_users

    disabled = await _run(disabled_users, acc.engine)
    per_user = {
        r.key: r
        for r in (await _run(report, _engine(request), by="user", since=whole_days(DAYS, time.time()), summary=False)).rows
    }
    return page(
        request,
        "people.html",
        s,
        status=status,
        users=users,
        groups=groups,
        tokens=toks,
        per_user=per_user,
        scopes=ALL_SCOPES,
        created=created,
        error=error,
        now=time.time(),
        disabled=disabled,
    )


@router.get("/admin/people")
async def people(request: Request):
    s = await _run(session_of, request)
    if s is None:
        return to_signin()
    return await _people(request, s)


@router.post("/admin/people/tokens")
async def create_token(request: Request):
    s, f = await _guarded_post(request)
    if s is None:
        return f
    from ..accounts import ALL_SCOPES

    scopes = [x for x in ALL_SCOPES if f.get(f"scope_{x}")]
    try:
        days = float(f.get("expires_days") or 0)
        if days < 0 or days > 3650:
            raise CodemoatError("expiry: between 0 (never) and 3650 days")
        expires = time.time() + days * 86400 if days else None
        from .people import check_enabled

        await _run(check_enabled, request.app.state.accounts.engine, f.get("user", "").strip() or f.get("name", "").strip())
        info, secret = await _run(
            request.app.state.accounts.create_token,
            f.get("name", "").strip(),
            f.get("user", "").strip() or None,
            tuple(scopes),
            expires,
        )
    except ValueError:
        return await _people(request, s, error="expiry: a number of days", status=400)
    except CodemoatError as e:
        return await _people(request, s, error=str(e), status=400)
    note(request, f"console: created token {info.id} ({info.name}) for user {info.user}, scopes {','.join(info.scopes)}")
    return await _people(request, s, created={"info": info, "secret": secret})


@router.post("/admin/people/tokens/revoke")
async def revoke_token(request: Request):
    s, f = await _guarded_post(request)
    if s is None:
        return f
    try:
        info = await _run(request.app.state.accounts.revoke_token, f.get("id", ""))
    except CodemoatError as e:
        return await _people(request, s, error=str(e), status=400)
    note(request, f"console: revoked token {info.id} of user {info.user}")
    return secure(RedirectResponse("/admin/people", status_code=303))


@router.post("/admin/people/groups")
async def set_groups(request: Request):
    s, f = await _guarded_post(request)
    if s is None:
        return f
    user = f.get("user", "").strip()
    groups = [g.strip() for g in f.get("groups", "").split(",") if g.strip()]
    try:
        acc = request.app.state.accounts
        if f.get("new"):
            await _run(acc.add_user, user, groups)
        else:
            await _run(acc.set_groups, user, groups)
    except CodemoatError as e:
        return await _people(request, s, error=str(e), status=400)
    note(request, f"console: {'added user' if f.get('new') else 'set groups of'} {user}: {','.join(groups) or '-'}")
    return secure(RedirectResponse("/admin/people", status_code=303))


# -- Model and license ------------------------------------------------------------------------
@router.get("/admin/model")
async def model(request: Request):
    s = await _run(session_of, request)
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


# -- Audit ---------------------------------------------------------------------------------
@router.get("/admin/audit")
async def audit(request: Request):
    s = await _run(session_of, request)
    if s is None:
        return to_signin()
    from ..audit.outbound import read_outbound

    f = auditview.Filters.of(dict(request.query_params))
    error = None
    try:
        before = int(request.query_params["before"]) if request.query_params.get("before", "").isdigit() else None
        recs = await _run(auditview.page, request.app.state.trust.log.engine, f, before)
    except CodemoatError as e:
        recs, error = [], str(e)
    outbound = (await _run(read_outbound))[-50:]
    alerts = await _run(auditview.alerts, request.app.state.trust.log.engine)
    return page(
        request,
        "audit.html",
        s,
        records=recs,
        filters=f,
        error=error,
        verify=getattr(request.app.state, "console_verify", None),
        outbound=list(reversed(outbound)),
        alerts=alerts,
        detail_text=auditview.detail_text,
        page_size=auditview.PAGE,
    )


@router.post("/admin/audit/verify")
async def audit_verify(request: Request):
    s, f = await _guarded_post(request)
    if s is None:
        return f
    rep = await _run(request.app.state.trust.log.verify)
    request.app.state.console_verify = {"at": time.time(), **rep.to_dict()}
    note(request, f"console: verified the audit log: {'OK' if rep.ok else f'FAILED at record {rep.first_bad}'}")
    return secure(RedirectResponse("/admin/audit", status_code=303))


@router.get("/admin/audit/export")
async def audit_export(request: Request):
    s = await _run(session_of, request)
    if s is None:
        return to_signin()
    import csv
    import io
    import json

    from ..audit.chain import FIELDS

    fmt = request.query_params.get("fmt", "jsonl")
    if fmt not in ("jsonl", "csv"):
        return refused(request, "unknown export format (jsonl or csv)")
    f = auditview.Filters.of(dict(request.query_params))
    try:
        f.where()
    except CodemoatError as e:
        return refused(request, str(e))
    log_engine = request.app.state.trust.log.engine
    cols = ["seq", "time", *FIELDS[2:], "hash"]

    def lines():
        if fmt == "csv":
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in auditview.rows(log_engine, f):
                w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
                if buf.tell() > 1 << 16:
                    yield buf.getvalue()
                    buf.seek(0)
                    buf.truncate()
            yield buf.getvalue()
        else:
            for r in auditview.rows(log_engine, f):
                yield json.dumps(r, ensure_ascii=False) + "\n"

    note(request, f"console: exported audit records as {fmt}")
    media = "text/csv" if fmt == "csv" else "application/x-ndjson"
    resp = StreamingResponse(
        lines(), media_type=media, headers={"Content-Disposition": f'attachment; filename="codemoat-audit.{fmt}"'}
    )
    return secure(resp)


# -- Costs ---------------------------------------------------------------------------------
@router.get("/admin/costs")
async def costs(request: Request):
    s = await _run(session_of, request)
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
        r = await _run(case, overrides, engine=_engine(request))
    except CodemoatError as e:
        error = str(e)
        r = await _run(case, {}, engine=_engine(request))
    months = [str(m) for m in range(1, r.inputs.months + 1)]
    shown = [r.onprem, *sorted(r.alternatives, key=lambda o: -o.cumulative[-1])[:5]]
    chart = charts.lines(
        f"Cumulative cost over {r.inputs.months} months (US$)", months, {o.name: o.cumulative for o in shown}, unit="$"
    )
    return page(request, "costs.html", s, r=r, names=names, chart=chart, error=error, overrides=overrides)


# -- Repositories ----------------------------------------------------------------------------
@router.get("/admin/repositories")
async def repositories(request: Request):
    s = await _run(session_of, request)
    if s is None:
        return to_signin()
    repos, error, langs = [], None, {}
    try:
        from ..index.store import SqliteIndex, default_path

        if default_path().exists():
            idx = SqliteIndex(default_path())
            try:
                from .repos import languages

                repos = await _run(idx.repos, True)
                langs = await _run(languages, idx)
            finally:
                idx.close()
    except Exception as e:  # the page says why rather than failing
        error = f"cannot read the code index: {type(e).__name__}: {e}"
    return page(request, "repositories.html", s, repos=repos, error=error, jobs=_jobs(request).latest(), langs=langs)


def _jobs(request: Request):
    from .jobs import Jobs

    j = getattr(request.app.state, "console_jobs", None)
    if j is None:
        j = request.app.state.console_jobs = Jobs(_engine(request))
    return j


@router.post("/admin/repositories/reindex")
async def reindex(request: Request):
    s, f = await _guarded_post(request)
    if s is None:
        return f
    name = f.get("name", "")
    try:
        job = await _run(_jobs(request).start, name, s.user)
    except CodemoatError as e:
        note(request, f"console: re-index refused: {e}")
        return page(request, "repositories.html", s, status=400, repos=[], error=str(e), jobs={})
    note(request, f"console: re-index of {name} started (job {job.id})")
    return secure(RedirectResponse(f"/admin/repositories/jobs/{job.id}", status_code=303))


@router.get("/admin/repositories/jobs/{job_id}")
async def reindex_job(request: Request, job_id: str):
    s = await _run(session_of, request)
    if s is None:
        return to_signin()
    job = _jobs(request).get(job_id)
    if job is None:
        return page(request, "job.html", s, status=404, job=None)
    return page(request, "job.html", s, job=job)


@router.post("/admin/people/disable")
async def disable_user(request: Request):
    s, f = await _guarded_post(request)
    if s is None:
        return f
    from .people import set_disabled

    user, disabled = f.get("user", ""), f.get("disabled") == "1"
    if user == s.user and disabled:
        return await _people(request, s, error="you cannot disable yourself", status=400)
    try:
        revoked = await _run(set_disabled, request.app.state.accounts.engine, user, disabled)
    except CodemoatError as e:
        return await _people(request, s, error=str(e), status=400)
    note(
        request,
        f"console: {'disabled' if disabled else 'enabled'} user {user}" + (f", revoked {revoked} token(s)" if revoked else ""),
    )
    return secure(RedirectResponse("/admin/people", status_code=303))
