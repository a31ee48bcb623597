"""A client that hangs up while its answer is prepared or generated: the work is cancelled, not finished
for nobody (`Service.run` and `Service.open_stream`)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import Request

from ..errors import CodemoatError


class ClientGone(CodemoatError):
    """The client closed the connection before the answer was ready (logged as nginx's 499)."""

    status = 499
    code = "client_closed_request"


async def unless_gone(request: Request, coro: Any) -> Any:
    """`coro`'s result, or `ClientGone` (and `coro` cancelled) if the client hangs up first."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        raise ClientGone("the client closed the connection; generation was cancelled")
    return work.result()


async def disconnected(request: Request) -> None:
    """Returns when the client hangs up (the request body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
