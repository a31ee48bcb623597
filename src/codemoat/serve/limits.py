"""The largest request body the server reads: a bigger one is a 413 in the caller's protocol shape.

It sits outside every other layer, so neither the audit middleware nor the secret screen reads a
body past the limit: `Content-Length` is checked before anything is read, and a body sent without
one (chunked) is counted as it arrives and cut off once it passes the limit.
"""

from __future__ import annotations

import logging

import anyio
from fastapi import Request

from ..errors import CodemoatError
from .errors import render

log = logging.getLogger("codemoat.serve")


class BodyTooLarge(CodemoatError):
    status = 413
    code = "request_too_large"


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` (0: no limit)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> BodyTooLarge:
        return BodyTooLarge(f"request body is larger than this server's limit of {self.max_bytes:,} bytes (server.max_body_mb)")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, send)
            return
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if not started:
                await self._refuse(scope, send)

    async def _refuse(self, scope, send) -> None:
        request = Request(scope)
        e = self._error()
        trust = getattr(getattr(scope.get("app"), "state", None), "trust", None)
        if trust is not None:  # refused outside the audit layer, so recorded here: every API request has its record
            try:
                await anyio.to_thread.run_sync(trust.write, scope, e.status, 0.0, "refused: body over server.max_body_mb")
            except Exception as exc:  # noqa: BLE001 - the refusal stands either way
                log.warning("could not audit a refused oversized request: %s", type(exc).__name__)
        response = render(request, e.status, str(e), e.code, {"Connection": "close"})
        await response(scope, _no_body, send)


async def _no_body() -> dict:
    return {"type": "http.disconnect"}
