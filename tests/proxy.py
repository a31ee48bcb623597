"""A tiny HTTP/1.1 forwarding proxy on 127.0.0.1 that can rewrite answers: the on-path attacker."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import httpx

# (path, status, body) -> (status, body): what the client gets instead
Rewrite = Callable[[str, int, bytes], tuple[int, bytes]]


class RewritingProxy:
    """Forwards every request to `upstream` and passes each answer through `rewrite`."""

    def __init__(self, upstream: str, rewrite: Rewrite):
        self.upstream, self.rewrite = upstream.rstrip("/"), rewrite
        self.seen: list[tuple[str, int, bytes]] = []  # what the real server answered
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = dict(l.split(": ", 1) for l in lines[1:] if ": " in l)
            length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0"))
            body = await reader.readexactly(length) if length else b""
            async with httpx.AsyncClient(trust_env=False, timeout=30) as c:
                r = await c.request(
                    method,
                    self.upstream + path,
                    content=body,
                    headers={"content-type": headers.get("content-type", "application/json")},
                )
            self.seen.append((path, r.status_code, r.content))
            status, out = self.rewrite(path, r.status_code, r.content)
            writer.write(
                f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(out)}\r\n"
                "connection: close\r\n\r\n".encode()
                + out
            )
            await writer.drain()
        finally:
            writer.close()

    def start(self) -> RewritingProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop)
        self._server = fut.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        # on the loop's own thread: asyncio's Server is not thread-safe (closing it from here raced a
        # connection the loop was finishing: "'NoneType' object is not iterable" in Server._wakeup)
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
