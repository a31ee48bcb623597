"""The HTTP app factory. State lives in `app.state` (set here and in the lifespan), never in module globals."""

from __future__ import annotations

import importlib.util
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .. import __version__
from ..accounts import Accounts
from ..config import Settings
from ..engines.holder import ModelHolder
from . import errors, routes_infill, routes_ollama, routes_openai, routes_tabby
from .limits import BodyLimit
from .service import Service

log = logging.getLogger("codemoat.serve")

_SECRET_INFO = {"watermark_key", "content_key"}


def create_app(settings: Settings, *, holder: ModelHolder, accounts: Accounts, retriever: Any | None = None) -> FastAPI:
    """An app serving `holder`'s model to callers authenticated by `accounts`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        hook = getattr(app.state, "on_shutdown", None)
        if hook is not None:
            hook()
        holder.close()

    app = FastAPI(title="codemoat", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.holder = holder
    app.state.accounts = accounts
    app.state.retriever = retriever
    app.state.service = Service(settings, holder, retriever)
    app.state.events = {}
    app.state.egress_allow = list(holder.info.get("egress_allow", []))
    errors.install(app)

    @app.get("/health")
    async def health(request: Request):
        info = {k: v for k, v in holder.info.items() if k not in _SECRET_INFO and k != "egress_allow"}
        sealed = "license_id" in info
        body = {
            "status": "ok" if holder.loaded else "unavailable",
            "version": __version__,
            "model": holder.model_id,
            "state": holder.state,
            "reason": holder.reason or None,
            "license": info if sealed else None,  # a plaintext model has none
            "model_file": None if sealed else (info or None),
        }
        if holder.loaded:
            body["engine"] = holder.get().health()
        return JSONResponse(body, status_code=200 if holder.loaded else 503)

    for r in (routes_openai.router, routes_ollama.router, routes_infill.router, routes_tabby.router):
        app.include_router(r)

    # The trust layer (audit, quotas, egress guard, metrics) wraps everything when present.
    if importlib.util.find_spec("codemoat.serve.trust") is not None:
        from . import trust

        trust.install(app, settings)
    # outermost: no layer reads a body past the limit (added last, so it wraps everything above)
    app.add_middleware(BodyLimit, max_bytes=int(settings.server.max_body_mb * (1 << 20)))
    return app
