"""Routes about the server rather than the model: Prometheus metrics (scope `metrics` or `admin`),
the admin API under `/admin/api/` (scope `admin`), and the OpenAPI document (any valid token;
the admin routes are listed only to admins). All read `request.app.state.trust`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import iter_route_contexts

from .. import __version__
from ..accounts import Principal
from ..audit.log import check_kind, parse_since
from ..audit.metrics import CONTENT_TYPE
from .auth import any_token, require

router = APIRouter()
admin = Depends(require("admin"))
scraper = Depends(require("metrics", quota=False))  # a scrape is not a request against anyone's quota
caller = Depends(any_token)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, _p=scraper) -> Response:
    return Response(request.app.state.trust.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, principal: Principal = caller) -> JSONResponse:
    """The API's description; admin routes only for a token that may call them."""
    app = request.app
    full = principal.can("admin")
    cache: dict[bool, dict[str, Any]] | None = getattr(app.state, "openapi", None)
    if cache is None:
        cache = app.state.openapi = {}
    if full not in cache:
        routes = [c for c in iter_route_contexts(app.routes) if full or not getattr(c.route, "path", "").startswith("/admin/")]
        cache[full] = get_openapi(title=app.title, version=__version__, routes=routes)
    return JSONResponse(cache[full])


@router.get("/admin/api/audit")
async def audit_records(
    request: Request,
    _p=admin,
    since: str | None = None,
    kind: str | None = None,
    user: str | None = None,
    after_seq: int = Query(0, ge=0, lt=1 << 63),  # a record number: SQLite's integers are 64-bit (a 500 past that)
    limit: int = 100,
):
    log = request.app.state.trust.log
    from ..errors import CodemoatError

    limit = max(1, min(limit, 1000))
    start = parse_since(since)
    check_kind(kind)
    if user is not None and "\x00" in user:  # PostgreSQL refuses a NUL in a query's text: a 500 (DataError), was
        raise CodemoatError("user: a NUL character is in no user name")

    def read():
        return list(log.records(since=start, kind=kind, user=user, after_seq=after_seq, limit=limit, newest_first=after_seq == 0))

    return {"records": await anyio.to_thread.run_sync(read)}


@router.get("/admin/api/audit/verify")
async def audit_verify(request: Request, _p=admin):
    rep = await anyio.to_thread.run_sync(request.app.state.trust.log.verify)
    return JSONResponse(rep.to_dict(), status_code=200 if rep.ok else 409)


@router.get("/admin/api/audit/head")
async def audit_head(request: Request, _p=admin):
    """The log's signed head, verified first, to keep off the machine (`codemoat audit verify --trusted-head`)."""
    from ..audit import trusted

    log = request.app.state.trust.log
    rep = await anyio.to_thread.run_sync(log.verify)
    if not rep.ok or rep.head is None:
        why = rep.problem if not rep.ok else "the audit log is empty: there is no signed head yet"
        return JSONResponse({**rep.to_dict(), "problem": why}, status_code=409)
    return trusted.document(rep.head, log.public_key())


@router.get("/admin/api/alerts")
async def alerts(request: Request, _p=admin, limit: int = 100):
    trust = request.app.state.trust

    def read():
        return list(trust.log.records(kind="alert", limit=max(1, min(limit, 1000)), newest_first=True))

    profiles = {u: trust.alarms.signals(u) for u in trust.alarms.users()}
    return {"alerts": await anyio.to_thread.run_sync(read), "profiles": profiles}


@router.get("/admin/api/users")
async def users(request: Request, _p=admin):
    quotas = request.app.state.trust.quotas
    rows = await anyio.to_thread.run_sync(request.app.state.accounts.list_users)
    for r in rows:
        r["generated_tokens_today"] = quotas.used_today(user=r["name"])
        r["throttled_rpm"] = quotas.throttled(r["name"])
    return {"users": rows, "limits": {"requests_per_minute": quotas.rpm, "tokens_per_day": quotas.tpd}}


@router.get("/admin/api/tokens")
async def tokens(request: Request, _p=admin):
    rows = await anyio.to_thread.run_sync(request.app.state.accounts.list_tokens)
    return {"tokens": [dict(asdict(t), active=t.active) for t in rows]}


@router.get("/admin/api/outbound")
async def outbound(request: Request, _p=admin):
    from ..audit.outbound import read_outbound

    return {"outbound": await anyio.to_thread.run_sync(read_outbound)}


@router.post("/admin/api/model/swap")
async def model_swap(request: Request, principal: Principal = admin) -> JSONResponse:
    """Serve the model `codemoat update apply` installed last (or `{"model", "license"}` given in the body),
    or with `{"adapter": NAME}` the installed version of vendor adapter NAME, without a restart: loaded
    beside the current engine, health-checked, swapped in; in-flight requests finish on the old one. A
    failed load or check leaves the old engine serving (the error is returned) and, for an installed
    version, rolls the update store back (serve.swapping). Every outcome is audited."""
    from ..errors import CodemoatError
    from .swapping import swap_installed

    from .body import read_json

    # read_json: not JSON, nested too deeply or holding a lone surrogate is a one-line 400 (was a 500)
    body: Any = await read_json(request) if (await request.body()).strip() else {}
    log = request.app.state.trust.log

    def audit(step: str, **detail: Any) -> None:
        log.append("update", user=principal.user, token_id=principal.token_id, route=f"update {step}", detail=detail)

    if "adapter" in body:
        from ..updates.bundle import check_name

        name = body["adapter"]
        if not isinstance(name, str) or not name:
            raise CodemoatError("adapter is the name of an installed adapter bundle")
        try:  # a bundle's name (what `update apply` installs): any other was echoed whole, twice per audit record
            check_name(name)
        except CodemoatError:
            shown = name if len(name) <= 100 else name[:100] + "..."
            raise CodemoatError(
                f"adapter {shown!r} is not a bundle name: letters, digits, '.', '_' or '-' (at most 100)"
            ) from None
        app = request.app
        return JSONResponse(
            await anyio.to_thread.run_sync(lambda: swap_installed(app, f"adapter:{name}", audit, add_adapter=True))
        )
    if body.get("model") is None:
        app = request.app
        return JSONResponse(await anyio.to_thread.run_sync(lambda: swap_installed(app, "model", audit)))
    try:
        out = await _swap_file(request, body)
    except Exception as e:
        reason, model = str(e)[:300], body.get("model")
        model = model[:1000] if isinstance(model, str) else type(model).__name__  # not a caller's megabyte per record
        await anyio.to_thread.run_sync(lambda: audit("swap_failed", model=model, reason=reason))
        raise
    await anyio.to_thread.run_sync(lambda: audit("swapped", **out))
    return JSONResponse(out)


async def _swap_file(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    """`{"model": PATH, "license": PATH}`: a model file not from the update store."""
    from pathlib import Path

    from ..engines.loader import swap_model
    from ..errors import CodemoatError

    holder, settings = request.app.state.holder, request.app.state.service.settings
    model, lic = body.get("model"), body.get("license")
    if not isinstance(model, str) or (lic is not None and not isinstance(lic, str)):
        raise CodemoatError("model and license are paths")
    if "\x00" in model + (lic or ""):  # os.stat would raise ValueError: a 500
        raise CodemoatError("model and license are paths, without a NUL byte")
    model = _file_on_disk(model)
    if lic and not model.endswith(".moat"):  # a plain model has no license to check: it was ignored, the swap a 200
        raise CodemoatError(f"{Path(model).name} is not sealed: a license goes with a sealed model (.moat); drop it")
    try:
        out = await anyio.to_thread.run_sync(lambda: swap_model(holder, settings, Path(model), Path(lic) if lic else None))
    except OSError as e:  # a name too long, a directory not readable: the caller's path, not a 500
        raise CodemoatError(f"cannot read the model or license file: {e.strerror or type(e).__name__}") from None
    request.app.state.egress_allow = list(holder.status.egress_allow)  # the new license's key server
    return dict(out, version=None)


def _file_on_disk(path: str) -> str:
    """`path` resolved, when it names a regular file (or a model folder) on a filesystem: not a descriptor of
    this process.

    A sealed model's plaintext is a memfd the server holds: `/proc/self/fd/N` (or `/dev/fd/N`) named as a
    plain GGUF loaded the licensed weights without the licence's watermark key (model.isolation = inline).
    Such a name resolves to `/memfd:... (deleted)`, which is no file; `/proc` and `/sys` are refused outright
    (devices are no regular file; a model on /dev/shm is). The load then opens the resolved path, the one
    checked."""
    import os

    from ..errors import CodemoatError

    real = os.path.realpath(os.path.expanduser(path))  # `~` as model.path takes it (engines.loader.open_model)
    # a model folder (safetensors: the transformers and vLLM engines) is a model on disk too
    if real in ("/proc", "/sys") or real.startswith(("/proc/", "/sys/")) or not (os.path.isfile(real) or os.path.isdir(real)):
        raise CodemoatError(f"model {path[:200]!r} is not a model file or folder on disk")
    return real
