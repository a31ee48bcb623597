"""Engines whose model generates synchronously: one worker thread owns the model.

A subclass implements `_prompt_ids(prompt, max_tokens)` (tokenise and check the context) and
`_generate(ids, params, emit, cancel)`, which runs on the worker and calls `emit(Chunk)` as text
becomes final (`StopCutter` does the stop-string bookkeeping). This class turns that into the
async `stream()`/`complete()` of `Engine`: the worker checks `cancel` between tokens, and a
stream whose consumer goes away sets it, so a disconnected client frees the worker at once.

In the server's own process (`model.isolation = inline`), `watch()` starts `watchdog.InlineWatch` over
the worker thread: each request is owed an answer from `_start` until the worker finishes it (`_owing`),
and a worker that owes answers and makes no progress is reported by `stall()`: the requests it owes and new
ones get `watchdog.Stalled` (503), `state` is "stalled" (`/health` 503), and an `engine_crashed` incident
goes to `on_incident`.
"""

from __future__ import annotations

import asyncio
import abc
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from ..errors import Overloaded
from .base import Chunk, Completion, Engine, FinishReason, SamplingParams, Timings

log = logging.getLogger("codemoat.engines")

_DONE = object()


def late(params: SamplingParams) -> bool:
    """Whether a request still waiting for the engine is past its `queue_deadline` (it gets `Overloaded`)."""
    return params.queue_deadline is not None and time.monotonic() > params.queue_deadline


class StopCutter:
    """Turns a growing decoded text into final chunks: the text's tail that could still become a stop
    string (the longest one a stop string begins with, as llama.cpp's server holds back) waits for the
    next token, the rest goes at once; a stop string ends generation and is not emitted. It also applies llama.cpp's
    line rules (`SamplingParams.n_indent`, `.time_limit_ms`), which end generation as a limit
    ("length"), and times the generation (`Timings` on the last chunk): it is made when the job
    starts on the worker, and the first `feed` comes with the first generated token."""

    def __init__(self, stops: list[str], emit: Callable[[Chunk], None], n_indent: int = 0, time_limit_ms: float | None = None):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=0)
        self._chars = frozenset("".join(self.stops))  # a tail can begin a stop string only if its last character is in one
        self.emit = emit
        self.sent = 0
        self.text = ""
        self.pending: list[int] = []
        self.n_indent, self.time_limit_ms = n_indent, time_limit_ms
        self.limited = False  # ended by a line rule, not by a stop string
        self.started = time.perf_counter()
        self.first: float | None = None
        self.cached: int | None = None  # the prompt's tokens the engine found in its cache (`Timings.cached`)
        self.seen = 0  # text before this was looked at for newlines (time limit)
        self.scan, self.line = 0, None  # where to find the next newline; start of the line being checked

    def feed(self, text: str, token_id: int, complete: int | None = None) -> bool:
        """`text` is everything decoded so far (its first `complete` characters are final, the
        rest may be a partial UTF-8 sequence). Returns True when generation is to end here."""
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.text = text
        self.pending.append(token_id)
        end = len(text) if complete is None else complete
        worded = min((i for i in (text.find(s, max(0, self.sent - self.hold)) for s in self.stops) if i >= 0), default=-1)
        short = self._indent_cut(text, end if worded < 0 else min(end, worded))
        cut = worded if short is None else short
        if cut >= 0:
            self.limited = short is not None
            if cut > self.sent:
                self.emit(Chunk(text[self.sent : cut], self.pending))
                self.pending = []
            self.text, self.sent = text[:cut], cut
            return True
        safe = end - self._partial(text, end)
        if safe > self.sent:
            self.emit(Chunk(text[self.sent : safe], self.pending))
            self.pending, self.sent = [], safe
        newline, self.seen = "\n" in text[self.seen : end], end
        if newline and self.time_limit_ms is not None and (now - self.first) * 1000 > self.time_limit_ms:
            self.limited, self.text = True, text[:end]
            return True
        return False

    def _partial(self, text: str, end: int) -> int:
        """Length of the longest tail of `text[:end]` that a stop string begins with (0: none). Holding back
        all `hold` characters instead kept a FIM answer's first ~18 characters (`<|file_separator|>`) waiting."""
        if not end or text[end - 1] not in self._chars:
            return 0
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, end), best, -1):
                if text.startswith(s[:k], end - k, end):
                    best = k
                    break
        return best

    def _indent_cut(self, text: str, end: int) -> int | None:
        """llama.cpp's `n_indent`: where the first line after the first newline that is indented less
        than `n_indent` has its first other character (a newline too), or None."""
        while self.n_indent > 0:
            if self.line is None:
                nl = text.find("\n", self.scan, end)
                if nl < 0:
                    self.scan = max(self.scan, end)
                    return None
                self.line = nl + 1
            i = self.line
            while i < end and text[i] in " \t":
                i += 1
            if i >= end:
                return None  # only indentation so far
            if i - self.line < self.n_indent:
                return i
            self.scan, self.line = i, None
        return None

    def finish(self, reason: FinishReason) -> None:
        if reason == "stop" and self.limited:
            reason = "length"  # llama.cpp's "limit"
        if reason != "cancelled" and (self.sent < len(self.text) or self.pending):
            self.emit(Chunk(self.text[self.sent :], self.pending))
        now = time.perf_counter()
        first = now if self.first is None else self.first
        self.emit(Chunk("", [], reason, Timings((first - self.started) * 1000, (now - first) * 1000, self.cached)))


class Jobs(queue.SimpleQueue):
    """A worker's job queue. In the engine process the batch loop also reads the server's socket
    (`engines.child`): it then waits in `poll` on that socket and on `wake_fd`, not in `get`, and a job
    put by another thread while it waits there (`sleeping`) writes `wake_fd` to wake it."""

    wake_fd: int | None = None
    sleeping = False

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item)
        fd = self.wake_fd
        if self.sleeping and fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except OSError:  # closed meanwhile: its loop has ended
                pass

    def waker(self) -> int:
        """The eventfd a put wakes while `sleeping` (made on first use)."""
        if self.wake_fd is None:
            self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return self.wake_fd

    def close_waker(self) -> None:
        """Close the eventfd (the loop that waited on it has ended)."""
        fd, self.wake_fd, self.sleeping = self.wake_fd, None, False
        if fd is not None:
            os.close(fd)


class WorkerEngine(Engine):
    """Base for engines with a synchronous model owned by one worker thread."""

    #: why the watchdog found the worker stalled (None: it is not), and its facts for `/health`
    stalled: str | None = None
    _stall: dict[str, Any] | None = None
    stalls = 0
    #: requests the worker finished (any way): progress, for the watchdog
    answered = 0
    _watch: Any = None

    def _start_worker(self, name: str) -> None:
        # SimpleQueue (in C): the worker blocked in get() has a put item ~10 µs sooner than with queue.Queue's
        # Python lock and condition, ~20 µs on the caches a large model's decode leaves, and the batch loop's
        # get_nowait between steps is cheaper too
        self._jobs: Jobs = Jobs()
        self._owed: dict[threading.Event, Callable[[BaseException | None], None]] = {}  # by cancel: `_owing`
        self._closed = False
        self._worker = threading.Thread(target=self._work, name=name, daemon=True)
        self._worker.start()

    # -- the watchdog (model.isolation = inline) ------------------------------------------------
    def watch(self, answer_timeout_s: float, spin_timeout_s: float, exit_on_hang: bool) -> None:
        """Watch the worker (`watchdog.InlineWatch`): owing answers, no progress and no work for `answer_timeout_s`,
        or no step while it runs on a core for `spin_timeout_s` (batching engines), is a stall; `exit_on_hang`
        then stops the server. Both 0: not watched."""
        if answer_timeout_s or spin_timeout_s:
            from .watchdog import InlineWatch

            self._watch = InlineWatch(self, answer_timeout_s, spin_timeout_s, exit_on_hang)

    @property
    def worker_tid(self) -> int | None:
        """The worker thread's id in /proc/self/task."""
        return self._worker.native_id

    def step_counter(self) -> Callable[[], int] | None:
        """Steps made so far, for an engine that steps (a batch's `llama_decode` calls); None: it does not."""
        return None

    def owed(self) -> bool:
        """Some request waits for the worker to finish it."""
        return bool(self._owed)

    def _owing(
        self, cancel: threading.Event, finished: Callable[[BaseException | None], None]
    ) -> Callable[[BaseException | None], None]:
        """Owe the request of `cancel` an answer until the worker calls the `finished` returned (which calls
        `finished`); a stalled engine refuses it (`watchdog.Stalled`)."""
        if self.stalled is not None:
            raise self._stall_error()
        owed = self._owed

        def done(exc: BaseException | None) -> None:
            ours = owed.pop(cancel, None) is not None  # else `stall` failed it already: finished once
            self.answered += 1
            if ours:
                finished(exc)

        owed[cancel] = finished
        return done

    def _stall_error(self) -> BaseException:
        from .watchdog import Stalled

        if self._stall is not None and self._stall.get("exit_status") is not None:
            return Stalled("the inference engine stopped answering and the server is restarting; retry in a moment")
        return Stalled("the inference engine stopped answering; retry in a moment")

    def stall(self, why: str, exit_status: int | None) -> None:
        """The watchdog found the worker stalled: the requests it owes get `watchdog.Stalled` (and are cancelled,
        should it come back), so will new ones, `state` says "stalled", and the incident is reported."""
        self._stall = {"why": why, "at": time.time(), "exit_status": exit_status}
        self.stalled, self.stalls = why, self.stalls + 1
        log.error("the inline engine for %s stalled: %s", self.model_id, why)
        err = self._stall_error()
        for cancel in list(self._owed):
            finished = self._owed.pop(cancel, None)
            if finished is not None:  # else the worker finished it meanwhile
                cancel.set()
                finished(err)
        if self.on_incident is not None:
            self.on_incident(
                "engine_crashed",
                {
                    "isolation": "inline",
                    "pid": os.getpid(),
                    "hung": True,
                    "why": why,
                    "exit_status": exit_status,  # not None: the server stops, for its service manager to start it again
                    "stalls": self.stalls,
                },
            )

    def probe(self) -> Future:
        """A job behind the ones queued: done once the worker works again."""
        fut: Future = Future()
        self._jobs.put((lambda: None, fut))
        return fut

    def unstall(self) -> None:
        """The worker took a job again: requests are taken again."""
        since = self._stall["at"] if self._stall is not None else time.time()
        self.stalled, self._stall = None, None
        log.warning("the inline engine for %s works again after %.0f s stalled", self.model_id, time.time() - since)

    @property
    def state(self) -> str:
        return "ready" if self.stalled is None else "stalled"

    def health(self) -> dict[str, Any]:
        out = super().health()
        if self._watch is not None:
            out.update(watchdog=self._watch.facts(), stall=self._stall, stalls=self.stalls)
        return out

    def _run_job(self, fn: Callable[[], Any]) -> Any:
        """Hook around each job on the worker (e.g. `torch.inference_mode()`)."""
        return fn()

    def _worker_setup(self) -> None:
        """Runs once on the worker thread before its first job."""

    def _work(self) -> None:
        self._worker_setup()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut = job
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(self._run_job(fn))
                except BaseException as e:  # delivered to the awaiting request
                    fut.set_exception(e)

    def _submit(self, fn: Callable[[], Any]) -> Future:
        if self._closed:
            raise self.closed_error()
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut

    def _stop_worker(self) -> bool:
        """Stop the worker after its current job; False if it was already stopped. A worker still running after
        that (`_worker.is_alive()`: stalled) may be inside the model: its caller must not free it."""
        if self._closed:
            return False
        self._closed = True
        if self._watch is not None:
            self._watch.stop()
        self._jobs.put(None)
        self._worker.join(timeout=1 if self.stalled is not None else 30)
        if not self._worker.is_alive():
            self._jobs.close_waker()
        return True

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def _prompt_ids(self, prompt: str | list[int], max_tokens: int) -> list[int]:
        """Token ids of `prompt` (ids pass through, built once by the server), checked by `check_count`
        (not empty, room for `max_tokens`)."""
        ids = list(prompt) if isinstance(prompt, list) else self.tokenize(prompt)
        self.check_count(len(ids), max_tokens)
        return ids

    @abc.abstractmethod
    def _generate(self, ids: list[int], params: SamplingParams, emit: Callable[[Chunk], None], cancel: threading.Event) -> None:
        """Runs on the worker: generate, emitting chunks; the last one carries `finish_reason`."""

    def _start(
        self,
        ids: list[int],
        params: SamplingParams,
        emit: Callable[[Chunk], None],
        cancel: threading.Event,
        finished: Callable[[BaseException | None], None],
    ) -> None:
        """Queue a generation and return at once: `emit` gets its chunks on the worker, then `finished`
        (None, or the error) is called once. Here a job per generation; a batching engine overrides it."""
        finished = self._owing(cancel, finished)

        def job() -> None:
            if cancel.is_set():  # its consumer left while it waited
                finished(None)
                return
            if late(params):  # it waited longer than it may
                finished(Overloaded())
                return
            try:
                self._generate(ids, params, emit, cancel)
            except BaseException as e:
                finished(e)
            else:
                finished(None)

        self._submit(job)

    async def stream(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        ids = self._prompt_ids(prompt, params.max_tokens)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(c: Chunk) -> None:
            loop.call_soon_threadsafe(q.put_nowait, c)

        def finished(exc: BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, (_DONE, exc))
            except RuntimeError:  # its event loop is closed: nobody is waiting
                pass

        self._start(ids, params, emit, cancel, finished)
        try:
            while True:
                item = await q.get()
                if isinstance(item, tuple) and item[0] is _DONE:
                    if item[1] is not None:
                        raise item[1]
                    break
                yield item
        finally:
            cancel.set()

    async def complete(self, prompt: str | list[int], params: SamplingParams) -> Completion:
        """The whole completion in one hop from the worker (no per-token event-loop traffic)."""
        ids = self._prompt_ids(prompt, params.max_tokens)
        cancel = threading.Event()
        chunks: list[Chunk] = []
        fut: Future = Future()

        def finished(exc: BaseException | None) -> None:
            if not fut.done():
                fut.set_exception(exc) if exc is not None else fut.set_result(None)

        self._start(ids, params, chunks.append, cancel, finished)
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            cancel.set()
            raise
        text = "".join(c.text for c in chunks)
        n_out = sum(len(c.token_ids) for c in chunks)
        reason = chunks[-1].finish_reason if chunks else "length"
        return Completion(text, len(ids), n_out, reason or "length")
