"""A slow-drip ("tarpit") HTTP server on 127.0.0.1: the on-path attacker (or broken peer) whose answer never ends.

While `on`, every request gets a status line, headers announcing `length` body bytes, then one body byte every
0.05 s until `off()`: each read is quick, so a per-read timeout (httpx's) never trips and only a deadline on the
whole answer ends the wait. `whole` answers some paths at once (e.g. a channel's index, so its bundle drips).
With an `upstream`, it starts off and forwards requests there (tests/proxy.py) until `on` is set.
`bounded` runs the code under test against it and fails the test when that code is still waiting."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from proxy import RewritingProxy

STEP_S = 0.05


class Tarpit(RewritingProxy):
    def __init__(self, upstream: str | None = None, *, length: int = 1_000_000, whole: dict[str, bytes] | None = None):
        super().__init__(upstream or "http://127.0.0.1:9", lambda path, status, body: (status, body))
        self.on = upstream is None  # a forwarding one starts off: the test turns it on when its client is set up
        self.length, self.whole = length, whole or {}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.on:
            return await super()._handle(reader, writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode("latin-1")
            if path in self.whole:
                body = self.whole[path]
                writer.write(f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
                await writer.drain()
                return
            writer.write(f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {self.length}\r\n\r\n".encode())
            while self.on:
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(STEP_S)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def start(self) -> Tarpit:
        super().start()
        return self

    def stop(self) -> None:
        """Ends every drip, then the server (its handlers end their loops before the event loop stops)."""
        self.on = False
        time.sleep(4 * STEP_S)
        super().stop()

    def __enter__(self) -> Tarpit:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def bounded(fn: Callable[[], object], still: str, seconds: float = 30) -> Exception | None:
    """Run `fn` in a thread, as the code under test runs; fail the test with `still` (what is still waiting) when
    it has not returned after `seconds`. Returns the exception it raised, None when it returned."""
    got: list[Exception] = []

    def run() -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the test looks at what it was
            got.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), still
    return got[0] if got else None
