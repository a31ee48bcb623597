"""uvicorn's HTTP/1.1 protocol (httptools), with a response's head sent in the same write as its first body.

uvicorn writes the status line and headers when the app sends `http.response.start`, and each body
message in a write of its own: two `send` syscalls, two segments and two wake-ups of the client before
it has a streamed answer's first token. codemoat's answers never start without a body at once (the
audit layer holds the start until the first body message, `serve.auditing`), so here the head's bytes
are held and go out with that first body: one write. Everything else is uvicorn's own code: the head is
built and checked by it, the body framed by it (chunked or sized), a 100-continue is still written
before the head, and a client gone before the first body gets nothing, as it would have got nothing
more.

uvicorn framed a streamed answer as chunked whatever the request's version, and an HTTP/1.0 client (or a proxy
that forwards as 1.0, nginx's default) read the chunk sizes as part of the events ("b3\r\ndata: ..."): RFC 9112
section 6.1 has a server send Transfer-Encoding only to HTTP/1.1. Such an answer's body ends with the connection
instead, as uvicorn already closes one after answering 1.0 (`HeadWithBody.send`).
"""

from __future__ import annotations

import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

#: the scope key of a request's `HeadWithBody.client_gone` (the audit layer asks it before recording a whole answer)
CLIENT_GONE = "codemoat.client_gone"
_HUNG_UP = {"type": "http.disconnect"}
_TCP_CLOSE = 7  # tcp_info's tcpi_state of a connection the peer reset (Linux's TCP_CLOSE)


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
    _unframed = False  # an HTTP/1.0 request's answer of no set length: its body ends with the connection
    half_closed = False  # the client has ended its side of the connection (`HttpProtocol.eof_received`)
    _told_whole = False

    async def receive(self) -> Any:
        """uvicorn's; once the client has half-closed, what is left of the body, then a hang-up.

        EOF alone cannot tell `shutdown(SHUT_WR)` from a client gone, so what watches for a hang-up (`serve.hangup`)
        still reads one, and a generation is cancelled as before; an answer made without watching is still written.
        (Here, not in a class the cycle becomes at EOF: its app holds this method, bound when it started.)"""
        if not self.half_closed or self.body or self.more_body or self.disconnected or self.response_complete:
            return await super().receive()
        if not self._told_whole:  # a request without a body, or a watch woken after it: once more, harmlessly
            self._told_whole = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if self.response_started:  # a stream: cut here, the connection with it
            self.disconnected = True
            self.transport.close()
        return _HUNG_UP

    def _unchunked(self, message: Any) -> None:
        """An answer to HTTP/1.0 with no Content-Length: sent as is, not chunked (see the module docstring), uvicorn
        told its length is open until the last body message (`send`)."""
        if self.scope["method"] == "HEAD" or message["status"] in (204, 304):
            return
        if any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in message.get("headers", ())):
            return
        self.chunked_encoding, self.expected_content_length, self._unframed = False, 1 << 62, True

    def client_gone(self) -> bool:
        """Whether nothing written here can reach the client (it hung up, or the connection was reset).

        The kernel is asked too: while requests are pipelined uvicorn stops reading the connection, so a reset
        (a client killed, or cut off by a proxy) is not seen until an answer is written to it. Here its socket's
        state says so before (TCP_CLOSE); the connection is then closed, and every request on it reads a hang-up."""
        if self.disconnected or self.transport.is_closing():
            return True
        sock = self.transport.get_extra_info("socket")
        try:
            reset = sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE
        except (OSError, AttributeError):  # not TCP, or not Linux: what uvicorn knows
            return False
        if reset:
            self.disconnected = True
            self.transport.close()
        return reset

    async def send(self, message: Any) -> None:
        if not self.disconnected and self.transport.is_closing():
            self.disconnected = True  # the client is gone: nothing more to write (its app reads a hang-up)
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()  # here, so that nothing below waits while the transport is stood in for
        if self._unframed and not message.get("more_body", False):  # the last: uvicorn then closes the connection
            self.expected_content_length = len(message.get("body", b""))
        real = self.transport
        if message["type"] == "http.response.start" and not self.response_started:
            if self.scope["http_version"] == "1.0":
                self._unchunked(message)
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
        cycle.__class__ = HeadWithBody  # made by uvicorn's on_headers_complete; `send` and `receive` differ
        cycle.scope[CLIENT_GONE] = cycle.client_gone  # type: ignore[attr-defined, literal-required]
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def eof_received(self) -> bool | None:
        """The client ended its side of the connection. Between requests, or within one, that is a hang-up, as
        uvicorn reads every EOF (the connection closes). After whole requests, the client may still be reading
        (`shutdown(SHUT_WR)`: `nc -N`, scripts, some proxies' health checks), and llama-server and nginx answer
        it: so here what was read is answered and the connection then closes. A client gone sends the same EOF,
        so what watches for a hang-up still reads one (`HeadWithBody.receive`): a generation is cancelled and
        its engine slot freed, as before."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete or cycle.more_body or self.scope is not cycle.scope:
            return None  # the transport closes: `connection_lost`
        for c in [self._running, *(c for c, _ in self.pipeline)]:
            if c is not None and not c.response_complete:
                c.half_closed = True  # type: ignore[attr-defined]
                c.message_event.set()  # a watch waiting for the hang-up wakes, and asks again
        cycle.keep_alive = False  # closed once the last request read is answered
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        """uvicorn marks the newest cycle disconnected; the one being answered and those pipelined behind it are
        marked too, so each reads a hang-up instead of answering a closed connection."""
        for cycle in [self._running, *(c for c, _ in self.pipeline)]:
            if cycle is not None and cycle is not self.cycle and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)
