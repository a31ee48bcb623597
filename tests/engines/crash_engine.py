"""A test-only engine: the real llama.cpp engine, plus prompt markers that kill the engine's process.

Served with `--engine crash_engine:CrashingEngine` and this folder on PYTHONPATH. The marker kills
the process as the request arrives, while another request may be generating. In a supervised
engine process that is only the engine; inline (`model.isolation = "inline"`) it is the whole
server, which is what the supervisor exists to prevent.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from concurrent.futures import Future
from typing import Any

from codemoat.engines.llamacpp import LlamaCppEngine

CRASH = "<<crash>>"  # SIGSEGV in the engine's process
CRASH_UNLESS_SAFE = "<<crash-unless-safe>>"  # SIGSEGV unless built with the safe options (use_extra_bufts=False)
SLOW = "<<slow>>"  # chunks paced 50 ms apart: a stream still running when another request crashes the engine
BAD_FRAME = "<<bad-frame>>"  # the first chunk's message pickles here but cannot be unpickled by the server
STOP_READING = "<<stop-reading>>"  # the engine process's reader stops for good (hung): it takes no more messages
SILENT_WORK = "<<silent-work>>"  # a long prefill: the worker computes SILENT_WORK_S before the first token, sending nothing
SILENT_WORK_S = 3.0
SLOW_STEPS = "<<slow-steps>>"  # batched: each step computes STEP_S on a core first (a large model's prompt: silent long)
STEP_S = 0.4
SPIN = "<<spin>>"  # the batch's loop spins for good before this request's first step: busy, no step, no message
SPIN_A_WHILE = "<<spin-until-released>>"  # as SPIN (batched), until `released()`
BLOCK = "<<block>>"  # the worker waits, asleep, before this request until RELEASE is set: no work, no step, no message
RELEASE = threading.Event()  # releases SPIN_A_WHILE and BLOCK in this process
RELEASE_FILE = "CODEMOAT_TEST_RELEASE"  # or SPIN_A_WHILE: the file this variable names exists (a server the test started)


def released() -> bool:
    path = os.environ.get(RELEASE_FILE)
    return RELEASE.is_set() or (path is not None and os.path.exists(path))


class _NoLoad:
    """Pickles, but unpickling it raises TypeError (dict(5)): a frame the server cannot read."""

    def __reduce__(self):
        return (dict, (5,))


def _bad_frame(emit):
    sent = [False]

    def bad(chunk):
        if not sent[0]:
            sent[0] = True
            chunk = dataclasses.replace(chunk, timings=_NoLoad())
        emit(chunk)

    return bad


class CrashingEngine(LlamaCppEngine):
    def __init__(self, model_path: str, *, use_extra_bufts: bool | None = None, **kw: Any):
        self.safe = use_extra_bufts is False
        super().__init__(model_path, use_extra_bufts=use_extra_bufts, **kw)

    def _prompt_ids(self, prompt, max_tokens):
        """Checked as a request arrives (`engines.child`), while another may be generating."""
        ids = super()._prompt_ids(prompt, max_tokens)
        text = self.detokenize(ids)
        if CRASH in text or (CRASH_UNLESS_SAFE in text and not self.safe):
            os.kill(os.getpid(), signal.SIGSEGV)
        if STOP_READING in text:  # on the process's reading thread
            threading.Event().wait()
        return ids

    def _generate(self, prompt_ids, params, emit, cancel) -> None:
        if SILENT_WORK in self.detokenize(prompt_ids):
            end = time.monotonic() + SILENT_WORK_S
            while time.monotonic() < end:
                sum(range(10_000))
        if BAD_FRAME in self.detokenize(prompt_ids):
            emit = _bad_frame(emit)
        if SLOW in self.detokenize(prompt_ids):
            inner = emit

            def emit(chunk):
                time.sleep(0.05)
                inner(chunk)

        super()._generate(prompt_ids, params, emit, cancel)

    def _start(self, ids, params, emit, cancel, finished) -> None:
        if SPIN in self.detokenize(ids) and self._batcher is not None:  # a job on the batch's own thread

            def spin() -> None:
                while True:
                    sum(range(10_000))

            self._jobs.put((spin, Future()))
        if SPIN_A_WHILE in self.detokenize(ids) and self._batcher is not None:

            def spin_a_while() -> None:
                while not released():
                    sum(range(10_000))

            self._jobs.put((spin_a_while, Future()))
        if BLOCK in self.detokenize(ids):  # a job on the worker, batched or not

            def block() -> None:
                RELEASE.wait()  # asleep: no wake-up, no time on a core or waiting for one

            self._jobs.put((block, Future()))
        if SLOW_STEPS in self.detokenize(ids) and self._batcher is not None:
            decode = self._batcher._decode

            def slow(n: int) -> int:  # STEP_S of this thread's time on a core, however loaded the machine
                end = time.thread_time() + STEP_S
                while time.thread_time() < end:
                    sum(range(10_000))
                return decode(n)

            self._batcher._decode = slow
        if BAD_FRAME in self.detokenize(ids):
            emit = _bad_frame(emit)
        if SLOW in self.detokenize(ids) and self._batcher is not None:  # batched: `_generate` is not used
            inner = emit

            def emit(chunk):
                time.sleep(0.05)
                inner(chunk)

        super()._start(ids, params, emit, cancel, finished)

    def health(self) -> dict[str, Any]:
        return {**super().health(), "built_safe": self.safe}
