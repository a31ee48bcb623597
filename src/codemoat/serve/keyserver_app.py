"""The key server's HTTP face: three JSON routes over `codemoat.vault.keyserver.KeyServer`.

    POST /v1/lease/challenge  {"license_id"}                    -> {"nonce", "expires_in"}
    POST /v1/lease            {license_id, machine_id, nonce, client_time, signature} -> {"lease", "signature"}
    POST /v1/lease/release    same shape as /v1/lease            -> {"released": true}
    GET  /health

Errors answer `{"error": {"code", "message"}}` with the status the key server chose. Answers are
signed, so plain HTTP on loopback or behind a TLS terminator is safe against tampering and replay.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..vault.clock import Clock
from ..vault.keyserver import KeyServer, LeaseDenied
from ..vault.vendor import Vendor


def _error(code: str, message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError:
        return None


def create_app(vendor: Vendor, clock: Clock | None = None) -> FastAPI:
    """An app serving leases for `vendor`'s licenses."""
    app = FastAPI(title="codemoat key server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.keyserver = KeyServer(vendor, clock)

    async def call(fn, request: Request) -> JSONResponse:
        body = await _body(request)
        if body is None:
            return _error("bad_request", "body is not JSON", 400)
        try:
            # Inline, not in a thread pool: the work is a millisecond of CPU (signatures, a local
            # SQLite transaction), and a thread hop costs more than it saves on a single process.
            return JSONResponse(fn(body))
        except LeaseDenied as e:
            return _error(e.code, str(e), e.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "keyserver_key": vendor.keyserver_key_b64}

    @app.post("/v1/lease/challenge")
    async def challenge(request: Request) -> JSONResponse:
        ks: KeyServer = request.app.state.keyserver
        return await call(lambda b: ks.challenge(b.get("license_id") if isinstance(b, dict) else None), request)

    @app.post("/v1/lease")
    async def lease(request: Request) -> JSONResponse:
        return await call(request.app.state.keyserver.lease, request)

    @app.post("/v1/lease/release")
    async def release(request: Request) -> JSONResponse:
        return await call(request.app.state.keyserver.release, request)

    return app
