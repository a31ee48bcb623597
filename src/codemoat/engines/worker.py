"""Engines whose model generates synchronously: one worker thread owns the model.

A subclass implements `_prompt_ids(prompt, max_tokens)` (tokenise and check the context) and
`_generate(ids, params, emit, cancel)`, which runs on the worker and calls `emit(Chunk)` as text
becomes final (`StopCutter` does the stop-string bookkeeping). This class turns that into the
async `stream()`/`complete()` of `Engine`: the worker checks `cancel` between tokens, and a
stream whose consumer goes away sets it, so a disconnected client frees the worker at once.
"""

from __future__ import annotations

import asyncio
import abc
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from ..errors import CodemoatError
from .base import Chunk, Completion, Engine, FinishReason, SamplingParams

_DONE = object()


class StopCutter:
    """Turns a growing decoded text into final chunks: text that could still begin a stop string
    is held back; a stop string ends generation and is not emitted."""

    def __init__(self, stops: list[str], emit: Callable[[Chunk], None]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=0)
        self.emit = emit
        self.sent = 0
        self.text = ""
        self.pending: list[int] = []

    def feed(self, text: str, token_id: int, complete: int | None = None) -> bool:
        """`text` is everything decoded so far (its first `complete` characters are final, the
        rest may be a partial UTF-8 sequence). Returns True when a stop string was reached."""
        self.text = text
        self.pending.append(token_id)
        cut = min((i for i in (text.find(s, max(0, self.sent - self.hold)) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            if cut > self.sent:
                self.emit(Chunk(text[self.sent : cut], self.pending))
                self.pending = []
            self.text, self.sent = text[:cut], cut
            return True
        end = len(text) if complete is None else complete
        safe = end - self.hold
        if safe > self.sent:
            self.emit(Chunk(text[self.sent : safe], self.pending))
            self.pending, self.sent = [], safe
        return False

    def finish(self, reason: FinishReason) -> None:
        if reason != "cancelled" and (self.sent < len(self.text) or self.pending):
            self.emit(Chunk(self.text[self.sent :], self.pending))
        self.emit(Chunk("", [], reason))


class WorkerEngine(Engine):
    """Base for engines with a synchronous model owned by one worker thread."""

    def _start_worker(self, name: str) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name=name, daemon=True)
        self._worker.start()

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
            raise CodemoatError("engine is closed")
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut

    def _stop_worker(self) -> bool:
        """Stop the worker after its current job; False if it was already stopped."""
        if self._closed:
            return False
        self._closed = True
        self._jobs.put(None)
        self._worker.join(timeout=30)
        return True

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def _prompt_ids(self, prompt: str, max_tokens: int) -> list[int]:
        """Token ids of `prompt`, checked by `check_count` (not empty, room for `max_tokens`)."""
        ids = self.tokenize(prompt)
        self.check_count(len(ids), max_tokens)
        return ids

    @abc.abstractmethod
    def _generate(self, ids: list[int], params: SamplingParams, emit: Callable[[Chunk], None], cancel: threading.Event) -> None:
        """Runs on the worker: generate, emitting chunks; the last one carries `finish_reason`."""

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[Chunk]:
        ids = self._prompt_ids(prompt, params.max_tokens)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(c: Chunk) -> None:
            loop.call_soon_threadsafe(q.put_nowait, c)

        def job() -> None:
            try:
                self._generate(ids, params, emit, cancel)
            finally:
                loop.call_soon_threadsafe(q.put_nowait, _DONE)

        fut = self._submit(job)
        try:
            while True:
                item = await q.get()
                if item is _DONE:
                    break
                yield item
            exc = fut.exception() if fut.done() else None
            if exc:
                raise exc
        finally:
            cancel.set()
            fut.cancel()  # still queued: never runs

    async def complete(self, prompt: str, params: SamplingParams) -> Completion:
        """The whole completion in one hop to the worker (no per-token event-loop traffic)."""
        ids = self._prompt_ids(prompt, params.max_tokens)
        cancel = threading.Event()
        chunks: list[Chunk] = []
        fut = self._submit(lambda: self._generate(ids, params, chunks.append, cancel))
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            cancel.set()
            fut.cancel()
            raise
        text = "".join(c.text for c in chunks)
        n_out = sum(len(c.token_ids) for c in chunks)
        reason = chunks[-1].finish_reason if chunks else "length"
        return Completion(text, len(ids), n_out, reason or "length")
