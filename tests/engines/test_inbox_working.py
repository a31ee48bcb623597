"""The server's `Inbox` finds an engine process hung when frames wait untaken for `STALL_S` *and* the process did no
work meanwhile (`watchdog.Working`). The batching engine's loop reads its socket between steps, and one step of a
large model on a CPU may take longer than `STALL_S`: a process that computes is not a reader that stopped
(reviewer's P1 on a81c4dd). Real processes over a real socket pair."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from codemoat.engines import inbox as inbox_mod
from codemoat.engines.child import Frames, frame
from codemoat.engines.inbox import Inbox
from codemoat.engines.watchdog import Working

#: the engine's side: takes no byte for HOLD_S, computing (`busy`) or asleep, then reads everything
PEER = """
import socket, sys, time
s = socket.socket(fileno=int(sys.argv[1])) if int(sys.argv[1]) >= 0 else None
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    if sys.argv[2] == "busy":
        sum(range(10_000))
    else:
        time.sleep(end - time.monotonic())  # one sleep: waking often would count (its waits for a core)
while s is not None and s.recv(1 << 20):
    pass
"""
HOLD_S = 3.0


def _peer(fd: int, kind: str, hold_s: float) -> subprocess.Popen:
    """The peer process, once its interpreter has started (its start-up is work, and not the test's)."""
    peer = subprocess.Popen(
        [sys.executable, "-c", PEER, str(fd), kind, str(hold_s)], pass_fds=[fd] if fd >= 0 else [], stdout=subprocess.PIPE
    )
    assert peer.stdout.readline() == b"ready\n"
    return peer


def _run(kind: str, monkeypatch, hold_s: float = HOLD_S) -> tuple[list[str], Inbox, subprocess.Popen]:
    monkeypatch.setattr(inbox_mod, "STALL_S", 1.0)
    ours, theirs = socket.socketpair()
    peer = _peer(theirs.fileno(), kind, hold_s)
    theirs.close()
    hung: list[str] = []
    box = Inbox(
        ours, Frames(ours), lambda rid: None, lambda u: None, lambda: None, "test", on_hung=hung.append, working=Working(peer.pid)
    )
    box.start()
    blob = frame(("gen", 1, list(range(20_000)), None))  # ~100 KB: a few fill the socket
    for _ in range(20):
        box.send(blob)
    assert box._out, "the socket took every frame: nothing waited"
    return hung, box, peer


def test_a_process_that_computes_without_reading_is_not_hung(monkeypatch):
    hung, box, peer = _run("busy", monkeypatch)
    try:
        end = time.monotonic() + HOLD_S + 10
        while box._out and time.monotonic() < end and not hung:
            time.sleep(0.05)
        assert not hung, hung
        assert not box._out, "the frames never went out once the process read again"
    finally:
        peer.kill()
        peer.wait()


def test_a_process_that_neither_reads_nor_works_is_hung(monkeypatch):
    hung, box, peer = _run("asleep", monkeypatch, hold_s=30)
    try:
        end = time.monotonic() + 20  # found after STALL_S (1 s) and a look or two: far sooner unless the machine crawls
        while not hung and time.monotonic() < end:
            time.sleep(0.05)
        assert hung and "did no work" in hung[0]
    finally:
        peer.kill()
        peer.wait()


def test_a_new_wait_takes_a_new_mark():
    """A mark from an earlier wait is not compared with: the first look after `reset` says nothing."""
    peer = _peer(-1, "busy", 30)
    try:
        w = Working(peer.pid)
        w()
        time.sleep(0.3)
        w.reset()
        assert w() is False
    finally:
        peer.kill()
        peer.wait()


@pytest.mark.parametrize("kind, expect", [("busy", True), ("asleep", False)])
def test_working_says_whether_the_process_ran_since_the_last_look(kind, expect):
    peer = _peer(-1, kind, 30)
    try:
        w = Working(peer.pid)
        assert w() is False  # the first look only takes the mark
        time.sleep(0.5)
        assert w() is expect
    finally:
        peer.kill()
        peer.wait()
    assert Working(peer.pid)() is False  # gone
