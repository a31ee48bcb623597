"""The HTTP app factory. State lives in `app.state` (set here and in the lifespan), never in module globals.

`GET /health` without a token is liveness only (`{"status": "ok"}`, or 503 while no model is
loaded): what a load balancer needs and nothing more. With a valid token it describes the model,
license and engine; a wrong token is a 401.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .. import __version__
from ..console.routes import router as console_router
from ..accounts import Accounts
from ..config import Settings
from ..engines.holder import ModelHolder
from . import directory, errors, routes_infill, routes_ollama, routes_openai, routes_tabby, trust
from .auth import authenticate, bearer
from .headers import PromptHeaders
from .hotpath import App
from .limits import BodyLimit
from .service import Service

log = logging.getLogger("codemoat.serve")


def create_app(settings: Settings, *, holder: ModelHolder, accounts: Accounts, retriever: Any | None = None) -> FastAPI:
    """An app serving `holder`'s model to callers authenticated by `accounts`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import anyio.lowlevel

        from .swapping import check_installed_at_start, start_handoff

        holder.loop_token = anyio.lowlevel.current_token()  # swaps health-check new engines on this loop
        await check_installed_at_start(app)  # a pending installed model version: checked before any request
        handoff = start_handoff(app)  # `codemoat update apply` swaps what it installed in here
        yield
        if handoff is not None:
            handoff.close()
        hook = getattr(app.state, "on_shutdown", None)
        if hook is not None:
            hook()
        holder.close()

    # /openapi.json is served by the trust layer, to callers with a token (admin routes to admins only)
    app = App(title="codemoat", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.holder = holder
    app.state.accounts = accounts
    app.state.retriever = retriever
    app.state.service = Service(settings, holder, retriever)
    app.state.events = {}
    app.state.egress_allow = list(holder.status.egress_allow)
    errors.install(app)

    @app.get("/livez")
    async def livez():
        """The process answers (a Kubernetes liveness probe): 200 even while the model is away, since
        a restart would not bring a lost lease back; /health is the readiness and load-balancer check."""
        return JSONResponse({"status": "alive"})

    @app.get("/health")
    async def health(request: Request):
        status = 200 if holder.ready else 503  # not ready: unloaded, loading, or its engine restarting
        if bearer(request.headers) is None:  # liveness: no detail without a token
            return JSONResponse({"status": "ok" if holder.ready else "unavailable"}, status_code=status)
        authenticate(request)  # a wrong token is a 401, not a quiet liveness answer
        st = holder.status  # holds no secret by construction
        body = {
            "status": "ok" if holder.ready else "unavailable",
            "version": __version__,
            "model": holder.model_id,
            "state": holder.state,
            "reason": holder.reason or holder.stall or None,  # a stall: why the inline engine's watchdog found it
            "license": asdict(st.license) if st.license else None,  # a plaintext model has none
            "model_file": None if st.license else {"path": st.path, "size": st.size},
            "bundle": asdict(st.bundle) if st.bundle else None,  # the installed update (`update:model`)
        }
        if holder.loaded:
            body["engine"] = holder.get().health()
            body["prompts"] = app.state.service.prompt_facts()  # FIM template, whether the suffix is used, chat format
        return JSONResponse(body, status_code=status)

    for r in (routes_openai.router, routes_ollama.router, routes_infill.router, routes_tabby.router):
        app.include_router(r)
    app.include_router(console_router)  # the admin console's pages at /admin (the admin JSON API is /admin/api, in trust)

    # The trust layer (audit, quotas, secret screen, egress guard, metrics, admin API) wraps every route.
    trust.install(app, settings)
    directory.install(app, settings)  # only with directory.ldap_url: sync, fail-closed gate, /auth/login
    app.add_middleware(PromptHeaders)  # X-Codemoat-Suffix etc., set while the prompt is built
    # outermost: no layer reads a body past the limit (added last, so it wraps everything above)
    app.add_middleware(BodyLimit, max_bytes=int(settings.server.max_body_mb * (1 << 20)))
    return app
