"""The server's side of an engine process's socket (`engines.supervised`): each message to its request.

An engine process sends one message per decoding step (`engines.child`). A reader thread that took
each one and handed it to the event loop woke two threads per token (the reader, then the loop through
its self-pipe): ~20 µs of CPU per token more than an engine in the server's own process, 4-5 % of a
32-token request on the bundled model (issue 15). So the event loop that streams reads the socket
itself (`attach`: `loop.add_reader`), one wake-up per step, as an in-process engine's
`call_soon_threadsafe` costs.

The `Inbox`'s thread stays, asleep. It reads only while no running loop does (`release`: a synchronous
`logits` call, a loop done with its requests while another loop's wait), and it watches for the end of the socket
(POLLRDHUP, which data does not wake) wherever the loop is, so a dead engine process is noticed at
once: the thread reads what is left, unhooks the loop and reports the end (`on_end`). Once a second it
also checks that the loop which reads still runs (a script's `asyncio.run` may end while a request of
another thread's loop waits).

Every read happens under one lock into one buffer, so a loop and the thread may both be readers for a
moment and each request still gets its messages whole and in order. A send never waits (`send`): what
the socket does not take at once waits in order in `_out` and the thread writes it as the engine
process reads (POLLOUT). A send that waited on the event loop held every other client's stream and
/health for as long as it took, up to `STALL_S` (session 9). Frames that move no byte for `STALL_S`
mean the process stopped reading (hung): `on_hung` (its supervisor kills it and restarts it, as after
a crash), and every later send fails at once.

Once a second while `busy()` (requests owe an answer) the thread also calls `tick()`: the supervisor's
answer watchdog (`engines.supervised`), which needs a wake-up even when nothing arrives.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..errors import CodemoatError
from .base import Chunk
from .child import Frames

log = logging.getLogger("codemoat.engines")
_ENDED = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
#: seconds queued frames may go without the engine process taking a byte, and without it doing any work,
#: before it is hung: it reads between its steps (a batching engine's loop reads its socket itself), so a
#: long step that computes is not a hang
STALL_S = 10.0


class EngineHung(OSError):
    """The engine process took no byte of a message for `STALL_S`: it stopped reading."""


def _flat(batch: list[Any]) -> list[Any]:
    """The messages of a batch, a batching engine's ("batch", [...]) of one step opened."""
    if not any(m[0] == "batch" for m in batch):
        return batch
    return [x for m in batch for x in (m[1] if m[0] == "batch" else (m,))]


def _error(text: str, name: str | None) -> CodemoatError:
    """The engine's error as the class it was raised as (`codemoat.errors`: `Overloaded` is a 503), else a 400."""
    from .. import errors

    cls = getattr(errors, name, None) if name else None
    return cls(text) if isinstance(cls, type) and issubclass(cls, CodemoatError) else CodemoatError(text)


def _chunks(items: list[Any]) -> list[Any]:
    """One request's messages of a burst as `Chunk`s (and its end: None or an error); consecutive chunks
    that end nothing are joined into one (a reader that fell behind hands over one chunk, not several)."""
    out: list[Any] = []
    text: list[str] = []
    ids: list[int] = []
    for it in items:
        if isinstance(it, tuple) and it[2] is None:
            text.append(it[0])
            ids.extend(it[1])
            continue
        if text:
            out.append(Chunk("".join(text), ids))
            text, ids = [], []
        out.append(Chunk(it[0], it[1], it[2], it[3]) if isinstance(it, tuple) else it)
    if text:
        out.append(Chunk("".join(text), ids))
    return out


class Request:
    """Where one request's messages go: an asyncio queue of its loop, or a future (a synchronous caller)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, future: Future | None = None):
        self.loop, self.future = loop, future
        self.queue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.answered = False  # its last message came (a chunk with a finish reason, its end, its result)
        self._sent = 0  # items handed to the loop from another thread, not yet in the queue
        self._lock = threading.Lock()

    def deliver(self, item: Any, here: asyncio.AbstractEventLoop | None = None) -> None:
        """Hand `item` over; `here` is the loop this runs on, if any: its own loop's queue takes it directly,
        unless items sent from another thread are still on their way (they come first)."""
        if self.future is not None:
            if not self.future.done():
                (self.future.set_exception if isinstance(item, BaseException) else self.future.set_result)(item)
            return
        with self._lock:
            if here is self.loop and not self._sent:
                self.queue.put_nowait(item)  # type: ignore[union-attr]
                return
            self._sent += 1
        try:
            self.loop.call_soon_threadsafe(self._put, item)  # type: ignore[union-attr]
        except RuntimeError:  # its event loop is closed: nobody is waiting
            pass

    def _put(self, item: Any) -> None:
        with self._lock:
            self._sent -= 1
        self.queue.put_nowait(item)  # type: ignore[union-attr]


class Inbox:
    """Reads one engine process's socket (see the module docstring). `route(rid)` is the request a
    message is for (None: cancelled, or its client left); `on_slots` gets a batching engine's slot use;
    `on_end` is called once, on the thread, after the last message was delivered; `on_hung(why)` when the
    process stopped taking frames and did no work meanwhile (`working()`, asked once a second while frames
    wait: a batching engine reads between its steps, and one step of a large model may take longer than
    `STALL_S`), and `tick()` once a second while `busy()`, all on the thread."""

    def __init__(
        self,
        sock: socket.socket,
        frames: Frames,
        route: Callable[[int], Request | None],
        on_slots: Callable[[dict[str, int]], None],
        on_end: Callable[[], None],
        name: str,
        *,
        on_hung: Callable[[str], None] = lambda why: None,
        busy: Callable[[], bool] = lambda: False,
        tick: Callable[[], None] = lambda: None,
        working: Callable[[], bool] = lambda: False,
    ):
        self.sock, self.fd, self.frames = sock, sock.fileno(), frames
        self.route, self.on_slots, self.on_end = route, on_slots, on_end
        self.on_hung, self.busy, self.tick, self.working = on_hung, busy, tick, working
        self.loop: asyncio.AbstractEventLoop | None = None  # the running loop that reads, if one does
        self.received = 0  # reads that brought messages (the answer watchdog's sign of life)
        self._rx = threading.Lock()  # one reader at a time: read, parse, deliver
        self._tx = threading.Lock()  # `_out` and writes
        self._out: deque[memoryview] = deque()  # frames (their rest) the socket did not take yet, in order
        self._moved = 0.0  # when the engine process last took a byte of `_out`
        self._dead: str | None = None  # why sends fail now (hung)
        self._mode = threading.Lock()  # who reads
        self._eof = self._over = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._watch, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread (once the supervisor knows this process: `on_end` may come at once)."""
        self._thread.start()

    # -- reading -------------------------------------------------------------------
    def _pump(self, here: asyncio.AbstractEventLoop | None = None) -> int:
        """Read once (without waiting) and deliver: 1 if messages came, 0 if none yet, -1 at the end."""
        with self._rx:
            if self._eof:
                return -1
            try:
                got = self.frames.pump()
                if got:
                    self.received += 1
                    self._dispatch(got, here)
            except (OSError, EOFError, ValueError, pickle.UnpicklingError):
                got = None
            except Exception:  # a frame that does not unpickle, a message of no known shape: its end, not a hang
                log.exception("a message from the engine process could not be read; ending it")
                got = None
            if got is None:
                self._eof = True
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)  # the engine process sees the end too, and exits
                except OSError:
                    pass
                return -1
            return 1 if got else 0

    def _dispatch(self, batch: list[Any], here: asyncio.AbstractEventLoop | None) -> None:
        bursts: dict[int, list[Any]] = {}  # one hand-off per request and batch
        for msg in _flat(batch):
            kind, rid = msg[0], msg[1]
            if kind == "chunk":
                bursts.setdefault(rid, []).append(msg[2])
            elif kind == "done":
                bursts.setdefault(rid, []).append(_error(msg[2], msg[3]) if msg[2] else None)
            elif kind == "slots":
                self.on_slots(msg[2])
            elif kind == "result" and (req := self.route(rid)) is not None:
                req.answered = True
                req.deliver(CodemoatError(msg[3]) if msg[3] else msg[2], here)
        for rid, items in bursts.items():
            if (req := self.route(rid)) is not None:
                last = items[-1]
                if not isinstance(last, tuple) or last[2] is not None:  # its end, or a chunk with a finish reason
                    req.answered = True
                req.deliver(_chunks(items), here)

    def _readable(self, loop: asyncio.AbstractEventLoop) -> None:
        """`loop`'s reader (it runs on `loop`)."""
        if self._pump(loop) >= 0:
            return
        loop.remove_reader(self.fd)  # the end: the thread takes it from here
        with self._mode:
            if self.loop is loop:
                self.loop = None
                self._poke()

    # -- who reads -------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let `loop` (running, on this thread) read, unless another running loop does already."""
        if self.loop is loop:
            return
        with self._mode:
            now = self.loop
            if self._over or now is loop or (now is not None and now.is_running()):
                return
            self._unhook(now)
            loop.add_reader(self.fd, self._readable, loop)
            self.loop = loop
            self._poke()

    def release(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Make sure someone reads: the thread, if the loop that did is not running any more, or is `loop`
        (running on this thread, done with its own requests while another caller's wait)."""
        with self._mode:
            now = self.loop
            if now is None or (now.is_running() and now is not loop):
                return
            self._unhook(now)
            self.loop = None
            self._poke()

    def _unhook(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Take the reader off `loop`, which is not running (or runs on this thread)."""
        if loop is not None and not loop.is_closed():
            try:
                loop.remove_reader(self.fd)
            except (RuntimeError, ValueError, OSError):
                pass

    def _poke(self) -> None:
        if not self._over:
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:  # already poked
                pass

    def _watch(self) -> None:
        poll, events = select.poll(), 0
        poll.register(self._wake_r, select.POLLIN)
        next_tick = 0.0
        while True:
            writing = bool(self._out)
            want = select.POLLRDHUP | (select.POLLIN if self.loop is None else 0) | (select.POLLOUT if writing else 0)
            if want != events:
                poll.register(self.fd, want)  # again: a change
                events = want
            got = dict(poll.poll(1000 if self.loop is not None or writing or self.busy() else None))
            if self._wake_r in got:
                os.read(self._wake_r, 512)
            ev = got.get(self.fd, 0)
            if ev & select.POLLOUT:
                self._flush()
            if ev & select.POLLIN and self.loop is None:
                if self._pump() < 0:
                    break
            elif ev & _ENDED:
                break
            now = time.monotonic()
            if now < next_tick:
                continue
            next_tick = now + 1.0
            if (loop := self.loop) is not None and not loop.is_running():
                self.release()  # a loop that stopped between two of its requests while another's wait: read for them
            if self._out and self.working():  # in a long step: its batch loop reads between steps
                self._moved = now
            elif not self._out and (reset := getattr(self.working, "reset", None)) is not None:
                reset()  # the next wait's first look takes a new mark
            if self._out and now - self._moved >= STALL_S:
                self._hang(f"the engine process took no message for {STALL_S:g} s and did no work: it stopped reading")
            elif self.busy():
                self.tick()
        while self._pump() > 0:  # what the socket still holds
            pass
        with self._mode:
            self._over, loop, self.loop = True, self.loop, None
        with self._tx:
            self._dead = self._dead or "the engine process is gone"
            self._out.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if loop is not None and loop.is_running():
            try:  # on its own thread, then the socket may close (a closed fd still in its selector breaks the fd's next user)
                loop.call_soon_threadsafe(self._unhook_and_close, loop)
            except RuntimeError:
                self._unhook_and_close(loop)
        else:
            self._unhook_and_close(loop)
        self.on_end()

    def _unhook_and_close(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._unhook(loop)
        self.sock.close()

    # -- writing -------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Send one frame (`child.frame`) without waiting: what the socket does not take now goes out from
        the thread, after the frames before it, as the engine process reads. `EngineHung` (an OSError)
        once the process was found hung or is gone."""
        with self._tx:
            if self._dead is not None:
                raise EngineHung(self._dead)
            if self._out:  # frames before it still wait: in order
                self._out.append(memoryview(data))
                return
            try:
                n = self.sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                n = 0
            if n == len(data):
                return
            self._out.append(memoryview(data)[n:])
            self._moved = time.monotonic()
            self._poke()  # the thread writes the rest (POLLOUT) and watches that it moves

    def _flush(self) -> None:
        """Write what the engine process takes now of the frames waiting (on the thread, at POLLOUT)."""
        with self._tx:
            while self._out:
                head = self._out[0]
                try:
                    n = self.sock.send(head, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return
                except OSError:  # the process is gone: the reader sees the end
                    self._out.clear()
                    return
                self._moved = time.monotonic()
                if n < len(head):
                    self._out[0] = head[n:]
                    return
                self._out.popleft()

    def _hang(self, why: str) -> None:
        """The engine process stopped taking frames: later sends fail at once, its supervisor ends it."""
        with self._tx:
            self._dead = why
            self._out.clear()
        self.on_hung(why)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # the reader sees the end (if `on_hung` did not end the process)
        except OSError:
            pass
