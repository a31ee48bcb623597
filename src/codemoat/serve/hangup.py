"""A client that hangs up while its answer is prepared or generated: the work is cancelled, not finished
for nobody (`Service.run`, `Service.open_stream` and the stream's `EventStream`)."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
from fastapi import Request

from ..errors import CodemoatError

#: the scope key under which `Service.open_stream` leaves its `Watch` for the stream's `EventStream`
WATCH = "codemoat.hangup"


class ClientGone(CodemoatError):
    """The client closed the connection before the answer was ready (logged as nginx's 499)."""

    status = 499
    code = "client_closed_request"


class Watch:
    """One plain task that waits for the client to hang up, then cancels the cancel scope guarding the
    request's work at that moment (`guard`); a hang-up seen while none does cancels the next one at once.

    A streamed request keeps one `Watch` from the wait for its first chunk to the stream's end: a task of
    its own per phase cost a task's start before the first event was written."""

    __slots__ = ("cut", "gone", "task")

    def __init__(self, receive: Any):
        self.cut: anyio.CancelScope | None = None
        self.gone = False
        self.task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self.cut is not None:
            self.cut.cancel()

    def guard(self) -> anyio.CancelScope:
        """A new cancel scope, the one a hang-up now cancels (already cancelled if the client is gone)."""
        cut = self.cut = anyio.CancelScope()
        if self.gone:
            cut.cancel()
        return cut

    def stop(self) -> None:
        self.cut = None
        self.task.cancel()


async def unless_gone(request: Request, coro: Any, watch: Watch | None = None) -> Any:
    """`coro`'s result, or `ClientGone` (and `coro` cancelled) if the client hangs up first.

    `coro` runs in the request's own task and one plain task (`Watch`; `watch`, if given, is left
    watching) waits for the hang-up: a task of its own would cost two turns of the event loop (to start
    it, to hand its result back) before the first token goes out."""
    w = Watch(request.receive) if watch is None else watch
    try:
        with w.guard():
            return await coro
    finally:
        if watch is None:
            w.stop()
        else:
            w.cut = None
    raise ClientGone("the client closed the connection; generation was cancelled")
