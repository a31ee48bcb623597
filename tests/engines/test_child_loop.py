"""The engine process's batch loop reads the server's socket itself (`_Server.serve_on_loop`): a request starts
on the thread that decodes it. Driven here in-process, over a real socket pair, on a real llama.cpp engine."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import pytest

from codemoat.engines.base import SamplingParams
from codemoat.engines.child import Frames, _Server, frame


@pytest.fixture
def looped(tiny_gguf):
    """(engine, server's end of the socket, its Frames, the loop's serving thread) with the loop reading."""
    from codemoat.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(str(tiny_gguf), n_ctx=512, n_threads=1, parallel=2)
    ours, theirs = socket.socketpair()
    served: list[bool] = []
    srv = _Server(eng, theirs)
    t = threading.Thread(target=lambda: served.append(srv.serve_on_loop(Frames(theirs))), daemon=True)
    t.start()
    eng.srv = srv
    end = time.time() + 10
    while eng._batcher.inbox is None and t.is_alive():  # the thread has handed the loop its reader
        assert time.time() < end, "the batch loop never took the reader"
        time.sleep(0.001)
    try:
        yield eng, ours, Frames(ours), t, served
    finally:
        ours.close()
        t.join(10)
        eng.close()
        theirs.close()


def _answers(frames: Frames, rids: set[int], seconds: float = 30) -> dict[int, str]:
    """The texts of requests `rids`, read from the engine's messages until each one's last chunk."""
    text: dict[int, list[str]] = {r: [] for r in rids}
    done: dict[int, str] = {}
    end = time.time() + seconds
    while len(done) < len(rids):
        assert select.select([frames.sock], [], [], max(0.0, end - time.time()))[0], (
            f"no answer to {rids - set(done)} in {seconds} s"
        )
        for msg in frames.pump() or []:
            for m in msg[1] if msg[0] == "batch" else [msg]:
                if m[0] == "chunk" and m[1] in rids:
                    text[m[1]].append(m[2][0])
                    if m[2][2]:
                        done[m[1]] = "".join(text[m[1]])
                elif m[0] == "done" and m[1] in rids:
                    raise AssertionError(f"request {m[1]} failed: {m[2]}")
    return done


def _sleeping(eng, seconds: float = 10) -> None:
    end = time.time() + seconds
    while not eng._jobs.sleeping:
        assert time.time() < end, "the loop never went to wait in poll"
        time.sleep(0.005)


def test_requests_sent_to_the_socket_are_answered_by_the_loop_that_reads_it(looped):
    eng, ours, frames, t, _ = looped
    ids = eng.tokenize("def add(a, b):\n")
    p = SamplingParams(max_tokens=8, temperature=0)
    alone = eng._batcher.inbox is not None and eng._jobs.wake_fd is not None
    assert alone, "the batch loop does not read the socket"
    ours.sendall(frame(("gen", 1, ids, p)))
    first = _answers(frames, {1})[1]
    ours.sendall(frame(("gen", 2, ids, p)) + frame(("gen", 3, ids, p)))  # two in one read
    assert first and _answers(frames, {2, 3}) == {2: first, 3: first}


def test_a_job_from_another_thread_wakes_the_loop_waiting_in_poll(looped):
    """A job put while the loop waits on the socket (logits, an adapter's load: other threads) is not left
    until the next request: the put writes the queue's eventfd, which the loop also waits on."""
    eng, _, _, _, _ = looped
    _sleeping(eng)
    got: list = []
    th = threading.Thread(target=lambda: got.append(eng.logits("def add(a, b):\n")), daemon=True)
    th.start()
    th.join(10)
    assert got and got[0].shape[0] == eng.n_vocab, "a job put by another thread waited for a request that never came"


def _on_core_ns(eng) -> int:
    with open(f"/proc/self/task/{eng._worker.native_id}/schedstat") as f:
        return int(f.read().split()[0])


def test_the_loop_sleeps_again_after_a_job_woke_it(looped):
    """The eventfd a put wrote is read back: a loop woken once by another thread's job does not spin after it."""
    eng, _, _, _, _ = looped
    _sleeping(eng)
    eng.logits("def add(a, b):\n")
    _sleeping(eng)
    before = _on_core_ns(eng)
    time.sleep(0.5)
    assert _on_core_ns(eng) - before < 50_000_000, "the idle loop ran on a core after a job woke it"


def test_a_job_put_just_before_the_loop_sleeps_is_not_left_waiting(looped):
    """A job put while the loop is about to wait (not yet `sleeping`, so no eventfd write) is taken: the loop
    looks at the queue after it says it sleeps, before it waits."""
    from concurrent.futures import Future

    eng, _, _, _, _ = looped
    _sleeping(eng)
    real, jobs, fut = eng._batcher.inbox, eng._jobs, Future()

    def racing(idle: bool) -> bool:
        if idle and not fut.done() and not jobs.sleeping:
            jobs.put((lambda: "ran", fut))  # `sleeping` is False: this put writes no eventfd
        return real(idle)

    eng._batcher.inbox = racing
    eng.probe().result(10)  # wakes the loop, which then calls `racing` idle
    assert fut.result(10) == "ran"


def test_an_idle_cancel_for_a_finished_request_leaves_the_loop_reading(looped):
    eng, ours, frames, _, _ = looped
    ids = eng.tokenize("def add(a, b):\n")
    p = SamplingParams(max_tokens=4, temperature=0)
    ours.sendall(frame(("gen", 1, ids, p)))
    first = _answers(frames, {1})[1]
    _sleeping(eng)
    ours.sendall(frame(("cancel", 1)) + frame(("cancel", 99)))
    time.sleep(0.05)
    _sleeping(eng)
    ours.sendall(frame(("gen", 2, ids, p)))
    assert _answers(frames, {2}, seconds=10)[2] == first


def test_stop_ends_the_reading_and_the_engine_still_closes(looped):
    eng, ours, _, t, served = looped
    _sleeping(eng)
    ours.sendall(frame(("stop",)))
    t.join(10)
    assert not t.is_alive() and served == [True]
    end = time.time() + 5
    while eng._batcher.inbox is not None and time.time() < end:
        time.sleep(0.005)
    assert eng._batcher.inbox is None  # the loop waits in `get` again: close() reaches it


def test_the_servers_end_going_away_ends_the_reading_and_cancels_what_runs(looped):
    eng, ours, _, t, served = looped
    ids = eng.tokenize("def add(a, b):\n")
    ours.sendall(frame(("gen", 1, ids, SamplingParams(max_tokens=400, temperature=0))))
    end = time.time() + 5
    while 1 not in eng.srv.cancels and time.time() < end:
        time.sleep(0.001)
    cancel = eng.srv.cancels[1]
    ours.close()
    t.join(10)
    assert cancel.is_set(), "the running request was not cancelled when the server went away"
    t.join(10)
    assert not t.is_alive() and served == [True]
    end = time.time() + 10
    while eng._batcher.active and time.time() < end:  # its cancel was set: the slot is freed at the next step
        time.sleep(0.01)
    assert not eng._batcher.active


def test_a_frame_that_cannot_be_read_ends_the_reading_not_the_loop(looped):
    eng, ours, _, t, served = looped
    ours.sendall(b"\x00\x00\x00\x05hello")  # not a pickle
    t.join(10)
    assert not t.is_alive() and served == [True]
    assert eng.logits("def add(a, b):\n").shape[0] == eng.n_vocab  # the loop still takes jobs


def test_a_message_of_no_known_shape_ends_the_reading_not_the_loop(looped):
    eng, ours, _, t, served = looped
    ours.sendall(frame(("gen", 1)))  # no prompt, no parameters: an IndexError in the loop's reading
    t.join(10)
    assert not t.is_alive() and served == [True]
    assert eng._worker.is_alive()
    assert eng.logits("def add(a, b):\n").shape[0] == eng.n_vocab


def test_the_server_going_away_ends_the_serving_while_the_loop_is_stuck(looped):
    """The waiting thread watches the server's end itself: a loop stuck in a step (here: a job that does not
    return) cannot keep the engine process, and the model in its memory, alive after its server is gone."""
    eng, ours, _, t, served = looped
    _sleeping(eng)
    stuck, free = threading.Event(), threading.Event()
    eng._submit(lambda: (stuck.set(), free.wait(30)))
    assert stuck.wait(10)
    ours.close()
    t.join(5)
    try:
        assert not t.is_alive() and served == [True], "the serving waited for a loop that does not come back"
    finally:
        free.set()


def _switches(tid: int) -> int:
    for line in open(f"/proc/self/task/{tid}/status"):
        if line.startswith("voluntary_ctxt_switches"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def test_the_waiting_thread_never_wakes_while_the_loop_serves(looped):
    """It waits for the loop's end or the server's with no timeout: a thread that woke each second counted as
    work to the server's answer watchdog on a busy machine (its waits for a core) and hid a hung engine."""
    eng, _, _, t, _ = looped
    _sleeping(eng)
    time.sleep(0.1)
    before = _switches(t.native_id)
    time.sleep(2.5)
    assert _switches(t.native_id) == before


def test_the_loop_ending_ends_the_serving(looped):
    eng, _, _, t, served = looped
    _sleeping(eng)
    eng._jobs.put(None)  # the loop stops (as after an error in a step)
    t.join(5)
    assert not t.is_alive() and served == [True]


def test_an_engine_without_a_batch_loop_is_read_by_the_calling_thread(tiny_gguf):
    from codemoat.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(str(tiny_gguf), n_ctx=512, n_threads=1, parallel=1)
    a, b = socket.socketpair()
    try:
        assert _Server(eng, b).serve_on_loop(Frames(b)) is False
    finally:
        a.close(), b.close()
        eng.close()


def _core_after(eng, message: bytes | None, ours: socket.socket, seconds: float) -> int:
    """Nanoseconds the idle loop spent on a core in the `seconds` after `message` was sent (None: nothing sent)."""
    _sleeping(eng)
    before = _on_core_ns(eng)
    if message is not None:
        ours.sendall(message)
    time.sleep(seconds)
    return _on_core_ns(eng) - before


def _polls_after(eng, message: bytes | None, ours: socket.socket, seconds: float) -> int:
    """The polls without sleeping the idle loop made in the `seconds` after `message` (None: nothing sent)."""
    _sleeping(eng)
    before = eng.srv.warm_polls
    if message is not None:
        ours.sendall(message)
    time.sleep(seconds)
    return eng.srv.warm_polls - before


def test_a_warm_message_keeps_the_idle_loop_polling_for_a_moment_then_it_sleeps(looped, monkeypatch):
    """("warm",): a request is being prepared. The idle loop polls without sleeping until `WARM_S` has passed
    (here 0.3 s), so the request does not wait for its vCPU to wake; then it waits in `poll` again and costs
    nothing (the thread's time on a core: absence only, which a busy machine cannot fake)."""
    from codemoat.engines import child

    eng, ours, _, _, _ = looped
    monkeypatch.setattr(child, "WARM_S", 0.3)
    monkeypatch.setattr(child, "CONTENDED_S", 10.0)  # this test's own thread takes the GIL, and so the core, from it
    assert _polls_after(eng, None, ours, 0.1) == 0
    assert _polls_after(eng, frame(("warm",)), ours, 0.1) > 0, "the warned loop slept"
    assert eng.srv.warm_until > 0.0, "the warned loop stopped polling 0.1 s into its 0.3 s"
    time.sleep(0.3)
    assert _polls_after(eng, None, ours, 0.3) == 0, "the loop kept polling after WARM_S had passed"
    assert _core_after(eng, None, ours, 0.5) < 30_000_000, "the idle loop ran on a core after its warning"


def test_a_request_after_warm_is_answered_as_without_it_and_ends_the_polling(looped, monkeypatch):
    """The announced request starts at once and answers as any other; once it came, the loop does not go on
    polling after it (here `WARM_S` is 5 s: a loop that kept the mark would poll through the check)."""
    from codemoat.engines import child

    eng, ours, frames, _, _ = looped
    ids = eng.tokenize("def add(a, b):\n")
    p = SamplingParams(max_tokens=8, temperature=0)
    ours.sendall(frame(("gen", 1, ids, p)))
    cold = _answers(frames, {1})[1]
    monkeypatch.setattr(child, "WARM_S", 5.0)
    monkeypatch.setattr(child, "CONTENDED_S", 10.0)  # the request, not this test's thread, must end the polling
    _sleeping(eng)
    ours.sendall(frame(("warm",)))
    time.sleep(0.05)
    ours.sendall(frame(("gen", 2, ids, p)))
    assert _answers(frames, {2})[2] == cold
    assert _polls_after(eng, None, ours, 0.3) == 0, "the loop polled on after the announced request came"


def test_a_warned_loop_that_shares_its_core_sleeps_instead_of_polling(looped, monkeypatch):
    """Another task on the loop's core: a thread that spins there waits out that task's slice when the request
    comes, where one that sleeps is woken at once. The loop stops polling once it finds it was kept off its core
    (`CONTENDED_S`), and sleeps: here, with `WARM_S` at 0.3 s and a process spinning on the same core, it gives up
    at the first such turn instead of taking half that core for 0.3 s."""
    import subprocess
    import sys

    from codemoat.engines import child

    eng, ours, _, _, _ = looped
    monkeypatch.setattr(child, "WARM_S", 0.3)
    cpu = sorted(os.sched_getaffinity(0))[0]
    tid = eng._worker.native_id
    before = os.sched_getaffinity(tid)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(tid, {cpu})
        os.sched_setaffinity(hog.pid, {cpu})
        time.sleep(0.2)  # the hog runs there
        _sleeping(eng)
        ours.sendall(frame(("warm",)))
        time.sleep(0.1)
        assert eng.srv.warm_polls > 0, "the warning never reached the loop"
        assert eng.srv.warm_until == 0.0, "the warned loop was still polling on a shared core, 0.1 s into its 0.3 s"
    finally:
        hog.kill()
        hog.wait()
        os.sched_setaffinity(tid, before)
