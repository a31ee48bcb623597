"""A request the inline watchdog failed (Stalled) has its `finished` called a second
time when the worker comes back and ends it (exit_on_hang = false). WorkerEngine._owing's `done` pops the request
and calls `finished` whatever the pop found; `stall()` had popped it and called `finished(Stalled)` already.
stream() then gets a second _DONE nobody reads; complete()'s `if not fut.done()` guard races the watchdog thread.
Found by reviewer V4 on e56ee5f; fixed by its patch (WorkerEngine._owing)."""

from __future__ import annotations

import threading

from codemoat.engines.templates import Part

from enginehelp import greedy
from test_inline_watchdog import inline_engine, wait_for


def test_a_stalled_request_is_finished_once(tiny_gguf):
    from crash_engine import BLOCK, RELEASE

    RELEASE.clear()
    eng, incidents = inline_engine(tiny_gguf, parallel=2)
    calls: list[object] = []
    got = threading.Event()

    def finished(exc):
        calls.append(exc)
        got.set()

    try:
        eng.watch(2.0, 0.0, exit_on_hang=False)
        ids = eng.encode([Part(BLOCK + "def f(", True)])
        eng._start(ids, greedy(max_tokens=2), lambda chunk: None, threading.Event(), finished)
        assert got.wait(120) and type(calls[0]).__name__ == "Stalled"
        RELEASE.set()
        wait_for(lambda: eng.state == "ready")
        wait_for(lambda: eng.answered >= 1)  # the worker ended the stuck request
        assert len(calls) == 1, calls
    finally:
        RELEASE.set()
        wait_for(lambda: eng.state == "ready")
        eng.close()
