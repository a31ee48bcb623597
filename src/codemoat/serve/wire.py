"""uvicorn's HTTP/1.1 protocol (httptools), with a response's head sent in the same write as its first body.

uvicorn writes the status line and headers when the app sends `http.response.start`, and each body
message in a write of its own: two `send` syscalls, two segments and two wake-ups of the client before
it has a streamed answer's first token. codemoat's answers never start without a body at once (the
audit layer holds the start until the first body message, `serve.auditing`), so here the head's bytes
are held and go out with that first body: one write. Everything else is uvicorn's own code: the head is
built and checked by it, the body framed by it (chunked or sized), a 100-continue is still written
before the head, and a client gone before the first body gets nothing, as it would have got nothing
more.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle


class _Held:
    """Stands in for the transport while uvicorn writes a head: keeps the bytes (anything else goes to it)."""

    __slots__ = ("data", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport, self.data = transport, b""

    def write(self, data: bytes) -> None:
        self.data += data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _After:
    """Stands in for the transport while uvicorn writes the first body: the held head goes first, in one
    write (anything else, such as the close after a last body on a connection not kept alive, goes to it)."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: Any, head: bytes) -> None:
        self.transport, self.head = transport, head

    def write(self, data: bytes) -> None:
        head, self.head = self.head, b""
        self.transport.write(head + data)

    def flush(self) -> None:
        """The head, if uvicorn wrote no body after all (an answer to HEAD)."""
        if self.head:
            self.write(b"")

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class HeadWithBody(RequestResponseCycle):
    """One request's cycle: `http.response.start`'s bytes are written with the next body message.

    A cycle whose connection has closed sends nothing, as uvicorn's own does once it is told (`disconnected`).
    uvicorn tells only the newest request it parsed: one answered while the client had pipelined more and then
    hung up wrote to the closed transport, and uvloop raised (two tracebacks in the log per such connection,
    from anyone, no token needed). Here the transport itself is asked, and `HttpProtocol` tells every cycle."""

    _head: bytes | None = None

    async def send(self, message: Any) -> None:
        if not self.disconnected and self.transport.is_closing():
            self.disconnected = True  # the client is gone: nothing more to write (its app reads a hang-up)
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()  # here, so that nothing below waits while the transport is stood in for
        real = self.transport
        if message["type"] == "http.response.start" and not self.response_started:
            held = self.transport = _Held(real)
            try:
                await super().send(message)
            finally:
                self.transport = real
            self._head = held.data
            return
        head, self._head = self._head, None
        if head is None or self.disconnected:
            await super().send(message)
            return
        after = self.transport = _After(real, head)
        try:
            await super().send(message)
        finally:
            self.transport = real
        after.flush()


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, its requests' cycles `HeadWithBody` (`uvicorn.Config(http=HttpProtocol)`)."""

    _running: RequestResponseCycle | None = None  # the cycle being answered (`self.cycle` is the newest parsed)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        cycle.__class__ = HeadWithBody  # made by uvicorn's on_headers_complete; only `send` differs
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def connection_lost(self, exc: Exception | None) -> None:
        """uvicorn marks the newest cycle disconnected; the one being answered and those pipelined behind it are
        marked too, so each reads a hang-up instead of answering a closed connection."""
        for cycle in [self._running, *(c for c, _ in self.pipeline)]:
            if cycle is not None and cycle is not self.cycle and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)
