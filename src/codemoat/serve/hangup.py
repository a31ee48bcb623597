"""A client that hangs up while its answer is prepared or generated: the work is cancelled, not finished
for nobody (`Service.run` and `Service.open_stream`)."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
from fastapi import Request

from ..errors import CodemoatError


class ClientGone(CodemoatError):
    """The client closed the connection before the answer was ready (logged as nginx's 499)."""

    status = 499
    code = "client_closed_request"


async def unless_gone(request: Request, coro: Any) -> Any:
    """`coro`'s result, or `ClientGone` (and `coro` cancelled) if the client hangs up first.

    `coro` runs in the request's own task and one plain task watches for the hang-up: a task of its own
    would cost two turns of the event loop (to start it, to hand its result back) before the first token
    goes out."""
    cut = anyio.CancelScope()

    async def watch() -> None:
        await disconnected(request)
        cut.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        with cut:
            return await coro
    finally:
        watcher.cancel()
    raise ClientGone("the client closed the connection; generation was cancelled")


async def disconnected(request: Request) -> None:
    """Returns when the client hangs up (the request body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
