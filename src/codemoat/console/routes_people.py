"""The console's People page: users, their groups and tokens, and the actions on them (create and
revoke a token, set a user's groups or add a user, disable or enable a user)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from ..errors import CodemoatError
from .web import DAYS, guarded_post, note, page, run, see_other, session_of, to_signin, usage_engine

router = APIRouter(include_in_schema=False)


async def _people(request: Request, s, *, created: dict | None = None, error: str | None = None, status: int = 200):
    from ..accounts import ALL_SCOPES
    from ..usage import report
    from ..usage.rollup import whole_days

    acc = request.app.state.accounts
    users = await run(acc.list_users)
    groups = await run(acc.list_groups)
    toks = await run(acc.list_tokens)
    from .people import disabled_users

    disabled = await run(disabled_users, acc.engine)
    per_user = {
        r.key: r
        for r in (await run(report, usage_engine(request), by="user", since=whole_days(DAYS, time.time()), summary=False)).rows
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
    s = await run(session_of, request)
    if s is None:
        return to_signin()
    return await _people(request, s)


@router.post("/admin/people/tokens")
async def create_token(request: Request):
    s, f = await guarded_post(request)
    if s is None:
        return f
    from ..accounts import ALL_SCOPES

    scopes = [x for x in ALL_SCOPES if f.get(f"scope_{x}")]
    try:
        days = float(f.get("expires_days") or 0)
        if not 0 <= days <= 3650:  # NaN too: it passed `days < 0 or days > 3650` (a token that never expired)
            raise CodemoatError("expiry: between 0 (never) and 3650 days")
        expires = time.time() + days * 86400 if days else None
        from .people import check_enabled

        await run(check_enabled, request.app.state.accounts.engine, f.get("user", "").strip() or f.get("name", "").strip())
        info, secret = await run(
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
    s, f = await guarded_post(request)
    if s is None:
        return f
    try:  # by id only: a token's name is its maker's choice, and one named like another's id shielded it
        info = await run(lambda: request.app.state.accounts.revoke_token(f.get("id", ""), by_id=True))
    except CodemoatError as e:
        return await _people(request, s, error=str(e), status=400)
    note(request, f"console: revoked token {info.id} of user {info.user}")
    return see_other("/admin/people")


@router.post("/admin/people/groups")
async def set_groups(request: Request):
    s, f = await guarded_post(request)
    if s is None:
        return f
    user = f.get("user", "").strip()
    groups = [g.strip() for g in f.get("groups", "").split(",") if g.strip()]
    try:
        acc = request.app.state.accounts
        if f.get("new"):
            await run(acc.add_user, user, groups)
        else:
            await run(acc.set_groups, user, groups)
    except CodemoatError as e:
        return await _people(request, s, error=str(e), status=400)
    note(request, f"console: {'added user' if f.get('new') else 'set groups of'} {user}: {','.join(groups) or '-'}")
    return see_other("/admin/people")


@router.post("/admin/people/disable")
async def disable_user(request: Request):
    s, f = await guarded_post(request)
    if s is None:
        return f
    from .people import set_disabled

    user, disabled = f.get("user", ""), f.get("disabled") == "1"
    if user == s.user and disabled:
        return await _people(request, s, error="you cannot disable yourself", status=400)
    try:
        revoked = await run(set_disabled, request.app.state.accounts.engine, user, disabled)
    except CodemoatError as e:
        return await _people(request, s, error=str(e), status=400)
    note(
        request,
        f"console: {'disabled' if disabled else 'enabled'} user {user}" + (f", revoked {revoked} token(s)" if revoked else ""),
    )
    return see_other("/admin/people")
