"""The engine process: `python -m codemoat.engines.child FD`, started by `engines.supervised`.

It reads one spec from the socket FD (engine class, model path, options), loads the engine (a
`WorkerEngine`: its worker thread generates and sends each chunk to the socket as it is final),
says `("ready", facts)`, then serves requests until told to stop or until the socket closes (the
server went away). The model path may be `/proc/self/fd/N` of a sealed memfd inherited from
the server: the plaintext is never decrypted again, nor written anywhere.

Messages are length-prefixed pickles (`frame`, `Frames`), between two processes of the same program:
    server → engine   ("gen", rid, prompt, params) · ("cancel", rid) · ("logits", rid, prompt) · ("stop",)
                      · ("warm",): a request is being prepared for an idle engine (`WARM_S`)
    engine → server   ("ready", facts) · ("error", message) · ("chunk", rid, (text, token_ids, finish_reason, timings))
                      · ("done", rid, error or None, error class or None) · ("result", rid, value, error or None)
                      · ("slots", 0, {"total", "busy", "waiting"}) when a batching engine's slot use changes
                      · ("batch", [message, ...]): a batching engine's messages of one step, sent together
                        (one pickle and one write per step for all its requests, not one per token)

Requests are multiplexed by rid: a batching engine (llama.cpp with `parallel` > 1) decodes many at
once, and a ("cancel", rid) frees that request's slot at the engine's next step. Its batch loop reads
the socket itself, between steps and while idle (`_Server.serve_on_loop`): a request starts on the
thread that decodes it. Other engines' messages are read by the main thread (`_Server.serve`).
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

_HEADER = struct.Struct(">I")
#: seconds an engine process whose server went away waits for its worker to stop before it exits anyway
GONE_EXIT_S = 2.0
#: seconds an idle batch loop told ("warm",) that a request is on its way polls its socket without sleeping.
#: Waking a thread whose vCPU is idle costs ~0.14 ms on a VM (`bench/results/serve-isolation.md`); the server
#: sends "warm" when it starts to build an idle engine's prompt, so that wake-up happens while it tokenises
#: instead of after. Short: on a core shared with another task the polling is charged to the loop's share of it
#: (EEVDF), so the decode after a request that came late in a long window was preempted sooner (reviewer, 1 ms:
#: 3.5 ms instead of 1.0 for 1 ms of work); 0.3 ms covers the bundled model's usual gap (~0.15 ms) and cost
#: nothing there. No `sched_yield`: EEVDF charges a yielder a whole slice. On a slower host (2026-12-06, session 21)
#: the server's gap was 0.5-0.6 ms and the window ran out first; a window fitted to the gap it measured (up to 1 ms)
#: gained nothing measurable in the one-client rows there and cost the 8-client editor mix 1.15-1.54x its p50 (an
#: A/A of one tree: 1.03): not kept.
WARM_S = 0.0003
#: seconds, in all, that a warned loop's polling may have spent off its core (another task ran there) before it
#: sleeps instead: checked each turn once the thread is back on its core (a request that comes while it waits for
#: its turn still waits out the other task's slice)
CONTENDED_S = 20e-6
PR_SET_DUMPABLE, PR_GET_DUMPABLE = 4, 3
log = logging.getLogger("codemoat.engines")


def set_non_dumpable() -> bool:
    """prctl(PR_SET_DUMPABLE, 0): no core dumps, and /proc/PID/mem and ptrace need CAP_SYS_PTRACE."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def is_dumpable() -> bool:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 1


def frame(msg: Any) -> bytes:
    """`msg` as it goes over the socket: its length, then its pickle."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def send(sock: socket.socket, msg: Any) -> None:
    sock.sendall(frame(msg))


class Frames:
    """The messages arriving on a socket, in batches: all that one read brought (a reader that fell
    behind catches up with one hand-off, not one per message)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, bytearray()
        self._scratch = bytearray(1 << 16)
        self._view = memoryview(self._scratch)
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    def parse(self) -> list[Any]:
        """The whole messages in the buffer, taken out of it."""
        out, pos, buf = [], 0, self.buf
        while len(buf) - pos >= _HEADER.size:
            (n,) = _HEADER.unpack_from(buf, pos)
            end = pos + _HEADER.size + n
            if len(buf) < end:
                break
            out.append(pickle.loads(buf[pos + _HEADER.size : end]))
            pos = end
        if pos:
            del buf[:pos]
        return out

    def _take(self) -> int | None:
        """One read that does not wait, added to the buffer: the bytes it brought (0: none yet); None at the end."""
        try:
            n = self.sock.recv_into(self._view, len(self._scratch), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0
        if n == 0:
            return None
        self.buf += self._view[:n]
        return n

    def pump(self) -> list[Any] | None:
        """What one read that does not wait brings, as whole messages ([] if none yet); None at the end."""
        n = self._take()
        return None if n is None else self.parse() if n else []

    def drain(self) -> list[Any] | None:
        """The whole messages of all that can be read without waiting ([] if none yet); None at the end."""
        while (n := self._take()) == len(self._scratch):  # a full read: there may be more
            pass
        return None if n is None else self.parse()

    def batch(self) -> list[Any] | None:
        """The next messages (at least one), waiting for them; None once the socket has ended. It waits in
        `poll`: a thread blocked in a read of a socket is woken each time the other side reads what another
        thread wrote to it (a token, in the engine process: ~30 wake-ups of a 32-token request for nothing)."""
        while not (out := self.parse()):
            self._poll.poll()
            n = self.sock.recv_into(self._view, len(self._scratch))
            if n == 0:
                return None
            self.buf += self._view[:n]
        return out


def messages(frames: Frames) -> Iterator[Any]:
    """Each message, until the socket ends or cannot be read."""
    while True:
        try:
            batch = frames.batch()
        except (OSError, EOFError, ValueError, pickle.UnpicklingError):
            return
        if batch is None:
            return
        yield from batch


def error_class(exc: BaseException | None) -> str | None:
    """The name of `exc`'s class in `codemoat.errors` (the server raises that class again: `Overloaded`
    is a 503 with Retry-After, not a 400), else None."""
    from .. import errors

    name = type(exc).__name__
    return name if exc is not None and getattr(errors, name, None) is type(exc) else None


def error_text(exc: BaseException) -> str:
    from ..errors import CodemoatError
    from .base import PromptTooLong

    if isinstance(exc, (CodemoatError, PromptTooLong)):
        return str(exc)
    log.error("engine request failed", exc_info=exc)
    return f"internal error in the engine ({type(exc).__name__})"


class _Server:
    """Runs each request as a job on the engine's worker thread, whose chunks go straight to the socket
    (no event loop in this process: one thread hop less per token than `stream()` would take)."""

    def __init__(self, engine: Any, sock: socket.socket, steps: Any = None):
        self.engine, self.sock = engine, sock
        self.cancels: dict[int, threading.Event] = {}
        self.stopped = False  # the server said stop (else it went away)
        self.warm_until = 0.0  # monotonic time until which an idle batch loop polls without sleeping ("warm")
        self.warm_polls = 0  # the polls it made so far (for tests; only the loop thread writes it)
        self._lock = threading.Lock()
        self._out: list[Any] = []  # a batching engine's messages of the current step
        self.batched = bool(getattr(engine, "batches", False))
        self.steps = steps if self.batched else None  # the server's `watchdog.StepCell`: the steps made so far
        if self.batched:  # it says when a slot is taken or freed, and when a step is over
            engine.on_slots = lambda usage: self.post(("slots", 0, usage))
            engine.after_step = self.flush

    def _count(self, engine: Any) -> int:
        """Decode steps of the engine's batch and of its folded adapters' engines."""
        b = getattr(engine, "_batcher", None)
        return (b.steps if b is not None else 0) + sum(self._count(f) for f in getattr(engine, "_folded", {}).values())

    def send(self, msg: Any) -> None:
        try:
            with self._lock:
                send(self.sock, msg)
        except OSError:  # the server is gone; the reader sees the end and stops us
            pass

    def post(self, msg: Any) -> None:
        """Send `msg` now, or, for a batching engine, with the rest of its step (`flush`)."""
        if not self.batched:
            self.send(msg)
            return
        with self._lock:
            self._out.append(msg)

    def flush(self) -> None:
        if self.steps is not None:
            self.steps.set(self._count(self.engine))
        with self._lock:
            out, self._out = self._out, []
            if not out:
                return
            try:
                send(self.sock, out[0] if len(out) == 1 else ("batch", out))
            except OSError:
                pass

    def generate(self, rid: int, prompt: str | list[int], params: Any) -> None:
        eng = self.engine
        try:
            ids = eng._prompt_ids(prompt, params.max_tokens)  # checked on arrival, not after the queue
        except Exception as e:
            self.send(("done", rid, error_text(e), error_class(e)))
            return
        cancel = self.cancels[rid] = threading.Event()

        def finished(exc: BaseException | None) -> None:
            self.cancels.pop(rid, None)
            if exc is not None:
                self.post(("done", rid, error_text(exc), error_class(exc)))

        def emit(c: Any) -> None:  # a tuple: a dataclass costs more to pickle
            self.post(("chunk", rid, (c.text, c.token_ids, c.finish_reason, c.timings)))

        try:  # a batching engine takes it into its running batch; others queue a job for their worker
            eng._start(ids, params, emit, cancel, finished)
        except Exception as e:
            finished(e)
            self.flush()

    def call(self, rid: int, fn: Any, *args: Any) -> None:
        try:
            value = fn(*args)
        except Exception as e:
            self.send(("result", rid, None, error_text(e)))
        else:
            self.send(("result", rid, value, None))

    def handle(self, msg: Any) -> bool:
        """Act on one message from the server; False once it says stop."""
        kind = msg[0]
        if kind == "stop":
            self.stopped = True
            return False
        if kind == "warm":
            self.warm_until = time.monotonic() + WARM_S
            return True
        rid = msg[1]
        if kind == "gen":
            self.warm_until = 0.0
            self.generate(rid, msg[2], msg[3])
        elif kind == "cancel":
            if (ev := self.cancels.get(rid)) is not None:
                ev.set()
        elif kind == "logits":  # waits for the worker: not on this thread, which must keep reading
            threading.Thread(target=self.call, args=(rid, self.engine.logits, msg[2]), daemon=True).start()
        return True

    def _ended(self) -> None:
        for ev in list(self.cancels.values()):
            ev.set()

    def serve(self, incoming: Iterator[Any]) -> None:
        for msg in incoming:
            if not self.handle(msg):
                break
        self._ended()

    def _wait(self, poller: select.poll) -> list[tuple[int, int]]:
        """`poller.poll()`, but while `warm_until` has not passed, poll without sleeping: the request the server
        announced starts without waiting for this vCPU to wake. Not once another task took the core meanwhile
        (`CONTENDED_S`): then it sleeps, to be woken as the request comes."""
        now = start = time.monotonic()
        if now < self.warm_until:
            ran = time.thread_time()
            while now < self.warm_until and (now - start) - (time.thread_time() - ran) < CONTENDED_S:
                self.warm_polls += 1
                ready = poller.poll(0)
                if ready:
                    return ready
                now = time.monotonic()
            self.warm_until = 0.0
        return poller.poll()

    def serve_on_loop(self, frames: Frames) -> bool:
        """Read the server's messages on the engine's batch loop (`LlamaCppEngine.read_on_loop`) until it says
        stop or the socket ends: a request then starts on the thread that decodes it, not one hand-off later. The
        loop reads between its steps and, idle, waits in `poll` on the socket and on its job queue's eventfd
        (jobs put by other threads: logits); for a moment after a "warm", it polls them without sleeping
        (`_wait`). This thread waits meanwhile, and ends the serving itself if the
        server's end goes away or the loop's thread dies, whatever the loop is doing (a step that never ends):
        the process then stops, and its supervisor starts another. False if the engine has no such loop
        (`serve`, on this thread, then)."""
        eng = self.engine
        if not getattr(eng, "reads_on_loop", False):
            return False
        jobs = eng._jobs
        sock_fd = frames.sock.fileno()
        over = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # the loop's reading ended
        over_lock, open_fds = threading.Lock(), [over]  # closed once this thread is done with it
        poller = select.poll()
        poller.register(sock_fd, select.POLLIN)
        poller.register(jobs.waker(), select.POLLIN)

        def loop_ended() -> None:  # the loop's reading ended, or the loop itself (on its thread, however it ends)
            with over_lock:
                if open_fds:
                    os.eventfd_write(over, 1)

        def end() -> bool:
            self._ended()
            loop_ended()
            return False

        def inbox(idle: bool) -> bool:
            try:
                readable = True
                if idle:
                    jobs.sleeping = True
                    try:
                        ready = self._wait(poller) if jobs.empty() else []
                    finally:
                        jobs.sleeping = False
                    readable = not ready
                    for fd, _ in ready:
                        if fd == sock_fd:
                            readable = True
                        else:
                            try:
                                os.eventfd_read(fd)
                            except BlockingIOError:
                                pass
                try:
                    got = frames.drain() if readable else []
                except (OSError, EOFError, ValueError, pickle.UnpicklingError):
                    return end()
                if got is None:
                    return end()
                for msg in got:
                    if not self.handle(msg):
                        return end()
                return True
            except Exception:
                log.exception("the engine process could not read the server's message; it stops")
                return end()

        eng.read_on_loop(inbox, loop_ended)
        watch = select.poll()
        watch.register(over, select.POLLIN)
        watch.register(sock_fd, select.POLLRDHUP)  # the server's end went away (data does not wake this)
        try:
            # no timeout: a thread that woke each second would count as work to the server's answer watchdog
            # on a busy machine (its waits for a core), and hide a hung engine (reviewer, ad3caee)
            got = dict(watch.poll())  # `over`, or the server went away (then `stopped` stays False: `main`)
            if got.get(over) and not eng._worker.is_alive():
                log.error("the engine's batch loop ended; the engine process stops")
        finally:
            self._ended()
            with over_lock:
                os.close(open_fds.pop())
        return True


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when its engine stops
    frames = Frames(sock)
    incoming = messages(frames)
    spec = next(incoming, None)  # the server sends nothing else until it is told "ready"
    if spec is None:
        return 1
    set_non_dumpable()  # exec made this process dumpable again; the weights are mapped below
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logging.getLogger("codemoat").addHandler(handler)
    logging.getLogger("codemoat").setLevel(spec.get("log_level", logging.INFO))

    from ..errors import CodemoatError
    from . import engine_class
    from .watchdog import StepCell
    from .worker import WorkerEngine

    try:
        engine = engine_class(spec["engine"]).from_path(spec["path"], **spec["opts"])
        if not isinstance(engine, WorkerEngine):
            raise CodemoatError(f"the {engine.name} engine cannot run in a separate process (it has no worker thread)")
    except CodemoatError as e:
        send(sock, ("error", str(e)))
        return 1
    send(
        sock,
        (
            "ready",
            {
                "n_ctx": engine.n_ctx,
                "n_vocab": getattr(engine, "n_vocab", None),
                "health": {**engine.health(), "non_dumpable": not is_dumpable()},
                "pid": os.getpid(),
                "counts_steps": bool(getattr(engine, "batches", False)) and spec.get("steps_fd") is not None,
                "reads_on_loop": bool(getattr(engine, "reads_on_loop", False)),  # `serve_on_loop`
            },
        ),
    )

    server = None
    try:
        steps = StepCell(spec["steps_fd"]) if spec.get("steps_fd") is not None else None
        server = _Server(engine, sock, steps)
        if not server.serve_on_loop(frames):
            server.serve(incoming)
    finally:
        if server is None or not server.stopped:  # the server went away: a worker stuck in a step must not keep the model here
            timer = threading.Timer(GONE_EXIT_S, os._exit, (1,))
            timer.daemon = True  # a close that ends in time ends the process as usual
            timer.start()
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
