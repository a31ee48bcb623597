"""The key server's HTTP face: three JSON routes over `codemoat.vault.keyserver.KeyServer`.

    POST /v1/lease/challenge  {"license_id", "client_nonce"}     -> {"nonce", "expires_in"}
    POST /v1/lease            {license_id, machine_id, nonce, client_time, signature} -> {"lease", "signature"}
    POST /v1/lease/release    same shape as /v1/lease            -> {"released": true}
    GET  /health

A refusal answers `{"error": {code, message, license_id, machine_id, nonce, server_time}, "signature"}`
with the status the key server chose, signed like a lease, so plain HTTP on loopback or behind a
TLS terminator is safe against tampering and replay of grants and refusals alike. Bodies over
`MAX_BODY` bytes get 413 before they are read whole, and JSON nested deeper than `MAX_DEPTH` gets
400 before it is parsed (a lease request is one flat object).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..vault.clock import Clock
from ..vault.keyserver import KeyServer, LeaseDenied
from ..vault.vendor import Vendor

MAX_BODY = 16 * 1024  # a lease request is about 400 bytes
MAX_DEPTH = 8


class _Refused(Exception):
    def __init__(self, err: LeaseDenied):
        self.err = err


def too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """True when `raw` nests arrays or objects deeper than `limit` (brackets inside strings do not count)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:  # every real request: one flat object
        return False
    depth, in_str, esc = 0, False, False
    for c in raw:
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:  # backslash
                esc = True
            elif c == 0x22:  # quote
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif c in (0x5D, 0x7D):
            depth -= 1
    return False


async def _body(request: Request) -> Any:
    """The parsed JSON body, or `_Refused` with 413 (too large) or 400 (not JSON, too deep)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise _Refused(LeaseDenied("too_large", f"request body over {MAX_BODY} bytes", 413))
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > MAX_BODY:
            raise _Refused(LeaseDenied("too_large", f"request body over {MAX_BODY} bytes", 413))
    if too_deep(raw):
        raise _Refused(LeaseDenied("bad_request", f"JSON nested deeper than {MAX_DEPTH} levels", 400))
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise _Refused(LeaseDenied("bad_request", "body is not JSON", 400)) from None


# `codemoat keyserver --workers N` names the vendor folder to its worker processes here (each opens it).
VENDOR_ENV = "CODEMOAT_KEYSERVER_VENDOR_DIR"


def app_from_env() -> FastAPI:
    """The app for one worker process of `codemoat keyserver --workers N` (uvicorn's factory)."""
    import os

    return create_app(Vendor.open(os.environ[VENDOR_ENV]))


def create_app(vendor: Vendor, clock: Clock | None = None) -> FastAPI:
    """An app serving leases for `vendor`'s licenses."""
    app = FastAPI(title="codemoat key server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.keyserver = KeyServer(vendor, clock)

    async def call(fn, request: Request) -> JSONResponse:
        ks: KeyServer = request.app.state.keyserver
        body: Any = None
        try:
            body = await _body(request)
            # Inline, not in a thread pool: the work is a millisecond of CPU (signatures, a local
            # SQLite transaction), and a thread hop costs more than it saves on a single process.
            return JSONResponse(fn(body))
        except _Refused as e:
            return JSONResponse(ks.refusal(e.err, None), status_code=e.err.status)
        except LeaseDenied as e:
            return JSONResponse(ks.refusal(e, body), status_code=e.status)

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
