"""An engine in a supervised child process: a native crash costs a restart, not the server.

    eng = SupervisedEngine.start(LlamaCppEngine, Path("model.gguf"), opts)   # or a MemfdBuffer
    async for chunk in eng.stream(prompt, params): ...

The child (`engines.child`) loads the model with the engine's own `from_path`; a sealed model's
memfd is inherited (`pass_fds`) and opened there as `/proc/self/fd/N`, so it is decrypted once,
by the server, and a restart needs no decryption. Tokenising stays in the server (`Engine.front`:
a tokenizer without weights), so only generation crosses the boundary: the prompt and sampling
parameters go over a Unix socket, chunks come back on it, and a client that hangs up sends a cancel.
The event loop that streams reads the chunks off the socket itself (`engines.inbox`: one wake-up per
token, as an in-process engine costs); a thread watches for the process's end.

When the child dies (a signal, or any exit the server did not ask for), its requests get 503, the
crash is reported, and the engine restarts after a backoff, on its safe options after repeated
crashes (`engines.restarts`). A process that stops taking frames (`inbox.STALL_S`), owes answers
and does nothing for `answer_timeout_s`, or (batching) owes answers and makes no step for
`spin_timeout_s`, however busy (`engines.watchdog`), is killed and handled the same way (the
incident's `hung`).

Closed by its holder (license revoked, lease expired), requests still holding it get 503 with the
holder's reason (`Engine.closed_why`); the front is left to be freed with this object, since such a
request may be tokenising with it on another thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CodemoatError, Unavailable
from .base import Chunk, Engine, SamplingParams
from .inbox import Inbox, Request
from .memfd import MemfdBuffer
from .restarts import Restarts
from .spawn import Child, Died, spawn
from .watchdog import AnswerWatch, Working

log = logging.getLogger("codemoat.engines")


class SupervisedEngine(Restarts, Engine):
    """The server's side of an engine running in a child process (see the module docstring)."""

    def __init__(
        self,
        engine_cls: type[Engine],
        source: Path | str | MemfdBuffer,
        opts: dict[str, Any],
        answer_timeout_s: float = 0.0,
        spin_timeout_s: float = 0.0,
    ):
        self.engine_cls, self.name = engine_cls, engine_cls.name
        self.opts = dict(opts)
        self.answer_timeout_s = answer_timeout_s  # `watchdog`: 0 = never
        self.spin_timeout_s = spin_timeout_s  # `watchdog`, a batching engine's steps: 0 = never
        self.model_id = str(opts.get("model_id") or "model")
        self._buf = source if isinstance(source, MemfdBuffer) else None
        self._path = source.path if isinstance(source, MemfdBuffer) else str(source)
        self._lock = threading.Lock()
        self._child: Child | None = None
        self._requests: dict[int, Request] = {}
        self._ids = itertools.count(1)
        self._state, self._closed = "starting", False
        self.crashes, self.restarts = 0, 0
        self.last_exit: str | None = None
        self.last_crash_at: float | None = None
        self.safe = False
        self._recent: deque[float] = deque()
        self._backoff = 0
        self._facts: dict[str, Any] = {}  # the loaded child's n_ctx, n_vocab and health
        self.front = engine_cls.front(self._path, **self.opts)

    @classmethod
    def start(
        cls,
        engine_cls: type[Engine],
        source: Path | str | MemfdBuffer,
        opts: dict[str, Any],
        answer_timeout_s: float = 0.0,
        spin_timeout_s: float = 0.0,
    ) -> SupervisedEngine:
        """Start the engine process and wait until its model is loaded; one `CodemoatError` line if it cannot.
        `answer_timeout_s`: how long it may owe answers, send nothing and compute nothing; `spin_timeout_s`:
        how long it may owe answers, send nothing and make no decode step, busy or not (`watchdog`)."""
        try:
            eng = cls(engine_cls, source, opts, answer_timeout_s, spin_timeout_s)
        except BaseException:
            if isinstance(source, MemfdBuffer):
                source.close(zero=True)
            raise
        try:
            try:
                eng._launch()
            except Died as d:
                if not engine_cls.safe_options:
                    raise
                eng._go_safe(f"the {eng.name} engine died with {d} while loading {eng.model_id}")
                eng._launch()
        except Died as d:
            eng.close()
            raise CodemoatError(f"the {eng.name} engine process died with {d} while loading model {eng.model_id}") from None
        except BaseException:
            eng.close()
            raise
        return eng

    # -- the child process ------------------------------------------------------
    def _launch(self, restart: bool = False) -> None:
        child = spawn(self.engine_cls, self._path, self.opts, self._buf)
        cell = child.steps
        watch = AnswerWatch(
            child.proc.pid,
            self.answer_timeout_s,
            lambda: child.inbox.received,  # type: ignore[union-attr]
            (lambda: cell.value) if cell is not None else None,
            self.spin_timeout_s,
        )

        def tick() -> None:
            if (why := watch.check()) is not None:
                child.kill_hung(why)

        child.inbox = Inbox(
            child.sock,
            child.frames,
            self._requests_get,
            self._slots,
            lambda: self._ended(child),
            f"engine-{child.proc.pid}",
            on_hung=child.kill_hung,
            busy=self._owed,
            tick=tick,
            # only where the batch loop reads (between its steps); a reader thread of its own answers at once
            working=Working(child.proc.pid) if child.facts.get("reads_on_loop") else (lambda: False),
        )
        with self._lock:
            if self._closed:
                child.inbox.start()
                child.stop()
                return
            self._child, self._state, self._facts = child, "ready", child.facts
            self.restarts += restart  # counted as it becomes ready, not after (a reader saw ready with the old count)
        child.inbox.start()
        log.info(
            "engine process %d serves %s (%s%s)", child.proc.pid, self.model_id, self.name, ", safe options" if self.safe else ""
        )

    def _requests_get(self, rid: int) -> Request | None:
        return self._requests.get(rid)  # None: cancelled, or its client left

    def _owed(self) -> bool:
        """Some request waits for the engine process's answer (or the rest of it)."""
        return any(not r.answered for r in list(self._requests.values()))

    def _slots(self, usage: dict[str, int]) -> None:
        self._facts["slots"] = usage

    def _ready_child(self) -> Child:
        child = self._child
        if child is None:
            if self._closed:
                raise self.closed_error()
            raise Unavailable(f"the inference engine is restarting after a crash ({self.last_exit}); retry in a moment")
        return child

    def _register(self, req: Request) -> tuple[int, Child]:
        with self._lock:
            child = self._ready_child()
            rid = next(self._ids)
            self._requests[rid] = req
        return rid, child

    # -- the Engine interface ----------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    @property
    def n_ctx(self) -> int:
        return int(self._facts["n_ctx"])

    @property
    def n_vocab(self) -> int | None:
        return self._facts.get("n_vocab")

    @property
    def metadata(self) -> dict[str, Any]:
        return self.front.metadata

    def has_token(self, text: str) -> bool:
        return self.front.has_token(text)

    def token_text(self, which: str) -> str:
        return self.front.token_text(which)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.front.tokenize(text, special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.front.detokenize(ids)

    def encode(self, parts: Sequence[Any], bos: bool = True) -> list[int]:
        return self.front.encode(parts, bos)

    def warm(self) -> None:
        """Tell an idle engine process whose batch loop reads its socket that a request is on its way
        (`child.WARM_S`): its loop polls without sleeping for a moment, so the request does not wait for its
        vCPU to wake. Not sent while a request is under way (the loop is awake then)."""
        child = self._child
        if child is None or self._requests or not child.facts.get("reads_on_loop"):
            return
        try:
            child.send(("warm",))
        except OSError:
            pass  # gone or hung: the request's own send says so

    async def stream(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        self.check_prompt(prompt, params.max_tokens)
        req = Request(loop=asyncio.get_running_loop())
        rid, child = self._register(req)
        finished = False
        try:
            child.inbox.attach(req.loop)  # type: ignore[union-attr,arg-type]  # this loop reads the answer itself
            try:
                child.send(("gen", rid, prompt, params))
            except OSError:
                raise Unavailable("the inference engine is restarting after a crash; retry in a moment") from None
            while True:
                got = await req.queue.get()  # type: ignore[union-attr]
                for item in got if isinstance(got, list) else (got,):
                    if isinstance(item, Chunk):
                        yield item
                        if item.finish_reason:
                            finished = True
                            return
                    else:
                        finished = True
                        if item is not None:
                            raise item
                        return
        finally:
            self._requests.pop(rid, None)
            if not finished:
                try:
                    child.send(("cancel", rid))
                except OSError:
                    pass
            if child.inbox.loop is req.loop and any(r.loop is not req.loop for r in list(self._requests.values())):  # type: ignore[union-attr]
                child.inbox.release(req.loop)  # type: ignore[union-attr]  # this loop may stop now: the thread reads for the others

    def logits(self, prompt: str) -> np.ndarray:
        req = Request(future=Future())
        rid, child = self._register(req)
        try:
            child.send(("logits", rid, prompt))
            while True:
                child.inbox.release()  # type: ignore[union-attr]  # read by the thread if no running loop reads
                try:
                    return req.future.result(timeout=1.0)  # type: ignore[union-attr]
                except TimeoutError:
                    continue
        finally:
            self._requests.pop(rid, None)

    def health(self) -> dict[str, Any]:
        child = self._child
        if child is not None and child.inbox is not None:
            child.inbox.release()  # the slot use is read even when no running loop reads
        return {
            **self._facts.get("health", {}),
            "queue": len(self._requests),
            "slots": self._facts.get("slots") or self._facts.get("health", {}).get("slots"),
            "sealed": self._buf is not None,
            "isolation": "process",
            "pid": child.proc.pid if child else None,
            "state": self._state,
            "crashes": self.crashes,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "last_signal": self.last_exit if (self.last_exit or "").startswith("SIG") else None,
            "last_crash_at": self.last_crash_at,
            "safe_options": self.safe,
        }

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed, self._state = True, "closed"
            child, self._child = self._child, None
            pending, self._requests = self._requests, {}
        for req in pending.values():
            req.deliver(self.closed_error())
        if child is not None:
            child.stop()
        # the front (a tokenizer, no weights) is freed with this object, not here: a request that took the
        # engine just before it closed may be tokenising with it on another thread (freed under it: SIGSEGV)
        if self._buf is not None:
            self._buf.close(zero=True)
            self._buf = None
