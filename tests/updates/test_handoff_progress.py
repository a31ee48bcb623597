"""`update apply` and a serve that is slow, hung or stopped (updates.handoff's progress lines). Before, apply
waited up to 900 s for each serve's one answer line, one serve after the other: a serve that accepted the
hand-off and never answered held `apply`, and every serve after it, for 15 minutes. Now a serve sends a
progress line at once and every few seconds while it swaps; apply gives up on one silent for `silence` s
(a serve that had sent progress is recorded lost, as one whose connection closed; one that said nothing is
reported and the store left alone), and a serve older than the progress lines still answers. Real unix
sockets and real listeners; `silence` is shortened here (the real one is updates.handoff.SILENCE_S)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from codemoat.unixsock import close_listener
from codemoat.updates.handoff import Listener, hand_over, run_dir


class Peer:
    """A unix listener at run/serve-PID.sock that reads the request, sends `lines`, then holds the connection
    open without a word (or closes it, with `close`), as a hung, stopped or old serve would."""

    def __init__(self, home, pid: int, lines: list[bytes], close: bool = False):
        run_dir(home).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = run_dir(home) / f"serve-{pid}.sock"
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(self.path))
        self.sock.listen(4)
        self.lines, self.close_after, self.held, self.requests = lines, close, [], []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn = self.sock.accept()[0]
            except OSError:
                return
            self.requests.append(json.loads(conn.makefile("rb").readline()))
            for line in self.lines:
                conn.sendall(line + b"\n")
            if self.close_after:
                conn.close()
            else:
                self.held.append(conn)

    def stop(self) -> None:
        for c in self.held:
            c.close()
        close_listener(self.sock)  # its accept() ends (close alone leaves it blocked, and listening)
        self.path.unlink(missing_ok=True)


def test_a_silent_listener_is_given_up_on_and_the_serves_after_it_still_swap(tmp_path):
    hung = Peer(tmp_path, 1, [])  # accepts, reads, never answers (asked first: serve-1 sorts before serve-PID)
    real = Listener(lambda chan: {"swapped": True, "version": "2"}, home=tmp_path).start()
    try:
        got = hand_over("model", home=tmp_path, silence=1, timeout=30)
        assert [a["pid"] for a in got] == [1, os.getpid()], got
        assert got[0]["ok"] is False and not got[0].get("lost"), got  # it never spoke: the store is left alone
        assert "no answer from the server" in got[0]["error"] and "in 1 s" in got[0]["error"], got
        assert got[1] == {"ok": True, "swapped": True, "version": "2", "pid": os.getpid()}  # the positive
        assert hung.requests == [{"op": "swap", "channel": "model", "progress": True}]
    finally:
        hung.stop()
        real.close()


def test_a_serve_that_stops_sending_progress_is_recorded_lost(shop, store, tmp_path, home):
    from codemoat.cli.updates_cmd import _lost_swaps

    lic = shop.license()
    v1 = store.apply(shop.release("1"), lic)
    store.confirm("model", v1["bundle_id"])
    v2 = store.apply(shop.release("2"), lic)
    stopped = Peer(home, 7, [b'{"progress": "swapping", "channel": "model", "seconds": 0}'])
    try:
        (a,) = hand_over("model", home=home, silence=1, timeout=30)
    finally:
        stopped.stop()
    assert a["ok"] is False and a["lost"] and a["silent"] and "said nothing for 1 s" in a["error"], a
    (a,) = _lost_swaps(store, "model", v2["bundle_id"], [a])
    assert "recorded as failed, the store is back on 1" in a["error"], a
    assert store.current("model")["version"] == "1"
    assert [(f["version"], f["reason"]) for f in store.failed()] == [("2", "server pid 7 stopped answering during the swap")]

    # the negative: a serve that closed without an answer is lost as before; one that answered is not
    v3 = store.apply(shop.release("3"), lic)
    gone = Peer(home, 8, [b'{"progress": "swapping", "channel": "model", "seconds": 0}'], close=True)
    try:
        (a,) = hand_over("model", home=home, silence=30, timeout=120)
    finally:
        gone.stop()
    assert a["lost"] and not a.get("silent"), a
    (a,) = _lost_swaps(store, "model", v3["bundle_id"], [a])
    assert a["error"].startswith("it ended during the swap") and store.current("model")["version"] == "1"


def test_a_long_swap_that_sends_progress_is_waited_for_and_old_peers_still_work(tmp_path):
    def slow(chan):
        time.sleep(6)  # three times the silence apply allows below: only the progress lines keep it waiting
        return {"swapped": True, "version": "2"}

    ln = Listener(slow, home=tmp_path, progress_s=0.1).start()
    try:
        (a,) = hand_over("model", home=tmp_path, silence=2, timeout=120)
        assert a == {"ok": True, "swapped": True, "version": "2", "pid": os.getpid()}, a

        # an `update apply` from before progress lines asks without "progress": it gets the answer line alone
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(120)
        c.connect(str(ln.path))
        c.sendall(b'{"op": "swap", "channel": "model"}\n')
        f = c.makefile("rb")
        assert json.loads(f.readline()) == {"ok": True, "swapped": True, "version": "2", "pid": os.getpid()}
        assert f.readline() == b""
        c.close()
    finally:
        ln.close()

    # a serve from before progress lines answers once, without progress: taken as its answer
    old = Peer(tmp_path / "old", 9, [b'{"ok": true, "swapped": true, "version": "2"}'], close=True)
    try:
        assert hand_over("model", home=tmp_path / "old", silence=2, timeout=120) == [
            {"ok": True, "swapped": True, "version": "2", "pid": 9}
        ]
    finally:
        old.stop()
