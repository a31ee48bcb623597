"""Progress means progress (updates.handoff): a serve's progress lines name the stage its swap is at, and
once one stage has lasted the stall bound the serve sends no more, so `update apply` gives up on a swap that
hangs (a load that never returns) after the bound and its silence, and records it lost. Before, the lines
were sent from a thread of their own whatever the swap did: a hung swap held `update apply`, and every serve
after it, for the whole 900 s. Real unix sockets, a real Listener and `hand_over`; the swap blocks on an event
the test sets. The bounds are shortened here (the real ones are STALL_S and SILENCE_S)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from codemoat.updates.handoff import Listener, _Lines, hand_over, stage


def test_a_swap_stuck_at_one_stage_stops_being_vouched_for_and_is_given_up_on(tmp_path):
    release, reached = threading.Event(), threading.Event()

    def hung(chan):
        stage("loading")
        reached.set()
        release.wait(120)  # the engine load that never returns (until the test lets it)
        return {"swapped": True, "version": "2"}

    ln = Listener(hung, home=tmp_path, progress_s=0.05, stall_s=0.5).start()
    try:
        (a,) = hand_over("model", home=tmp_path, silence=1, timeout=60)
        assert reached.is_set()
        # apply's timeout (60 s) is not what ended it: the serve fell silent, so it is lost, as a stopped one
        assert a["ok"] is False and a["lost"] and a["silent"], a
        assert "said nothing for 1 s during the swap (hung or stopped, at stage 'loading')" in a["error"], a
    finally:
        release.set()
        ln.close()


def test_a_swap_that_moves_from_stage_to_stage_is_vouched_for_past_the_bound(tmp_path):
    seen: list[str] = []

    def moving(chan):
        for at in ("loading", "checking", "switching", "confirming", "recording", "done"):
            stage(at)
            seen.append(at)
            time.sleep(0.4)  # each stage well inside the bound, all of them together well past it
        return {"swapped": True, "version": "2"}

    ln = Listener(moving, home=tmp_path, progress_s=0.05, stall_s=2).start()
    try:
        (a,) = hand_over("model", home=tmp_path, silence=1, timeout=120)
        assert a == {"ok": True, "swapped": True, "version": "2", "pid": os.getpid()}, a
        assert len(seen) == 6

        # the lines as an `update apply` reads them: the stage, and how long the swap and the stage have run
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(120)
        c.connect(str(ln.path))
        c.sendall(b'{"op": "swap", "channel": "model", "progress": true}\n')
        lines = [json.loads(x) for x in c.makefile("rb")]
        c.close()
        *progress, answer = lines
        assert answer == {"ok": True, "swapped": True, "version": "2", "pid": os.getpid()}
        assert {p["progress"] for p in progress} <= {"waiting", "swapping"}  # what older applies knew
        assert {"loading", "confirming", "done"} <= {p["stage"] for p in progress}, progress
        assert all(isinstance(p["seconds"], int) and isinstance(p["stage_seconds"], int) for p in progress)
    finally:
        ln.close()


def test_an_older_apply_of_a_stuck_swap_also_hears_silence_and_a_moving_swap_speaks_again(tmp_path):
    """An older `update apply` reads any progress line as life: it gets none once the stage stalls. A stage
    that moves again (a slow step, not a hung one) has its lines again."""
    move, done = threading.Event(), threading.Event()

    def slow(chan):
        stage("loading")
        move.wait(120)
        stage("confirming")
        done.wait(120)
        return {"swapped": True, "version": "2"}

    ln = Listener(slow, home=tmp_path, progress_s=0.05, stall_s=0.3).start()
    c = socket.socket(socket.AF_UNIX)
    try:
        c.connect(str(ln.path))
        c.sendall(b'{"op": "swap", "channel": "model", "progress": true}\n')
        lines = _Lines(c)
        while json.loads(lines.next(30))["stage"] != "loading":
            pass
        for _ in range(100):  # a few lines more at most, then none: six times the bound without one
            try:
                lines.next(2)
            except TimeoutError:
                break
        else:
            raise AssertionError("a stalled swap is still vouched for")
        move.set()
        assert json.loads(lines.next(30))["stage"] == "confirming"
        done.set()
        while "ok" not in (last := json.loads(lines.next(30))):
            pass
        assert last == {"ok": True, "swapped": True, "version": "2", "pid": os.getpid()}
    finally:
        move.set()
        done.set()
        c.close()
        ln.close()
