"""`update apply` hands what it installed to the running serve (updates.handoff); a version that fails
the server's health check leaves the old one serving and the store rolled back, recorded and audited."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import httpx
import pytest

from codemoat.errors import CodemoatError
from updhelp import Streams, create_token, mute_gguf, one_line_error, run_cli


def test_store_fail_makes_the_previous_version_current_and_records_the_failed_one(shop, store):
    lic = shop.license()
    v1 = store.apply(shop.release("1"), lic)
    v2 = store.apply(shop.release("2"), lic)
    assert store.fail("model", v1["bundle_id"], "not current") is None  # nothing to undo: unchanged
    assert store.current("model")["version"] == "2"
    back = store.fail("model", v2["bundle_id"], "the new model produced no tokens for the health-check prompt")
    assert back == {"channel": "model", "failed": "2", "version": "1"}
    assert store.current("model")["bundle_id"] == v1["bundle_id"]
    assert not os.path.exists(v2["dir"]) and os.path.exists(v1["dir"])
    rows = store.list()
    # 1 was never health-checked by a serve either: still pending
    assert [(r["version"], r["current"], r.get("status")) for r in rows] == [("1", True, "pending"), ("2", False, "failed")]
    assert "no tokens" in rows[1]["reason"]
    assert ("swap_rolled_back", "2") in [(s, d.get("failed")) for s, d in store.records]
    assert store.apply(shop.release("2.1"), lic)["previous"] == "1"  # the next release installs over 1


def as_nobody(fn) -> int:
    """The wait status of a forked child that runs `fn()` as uid 65534 (another account) and exits with
    what it returns (5 if it raised)."""
    pid = os.fork()
    if pid == 0:
        code = 5
        try:
            os.setuid(65534)
            code = fn()
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def cannot_connect(path: Path) -> int:
    """0 if connecting to the listener at `path` is refused by the file system, else 3."""
    c = socket.socket(socket.AF_UNIX)
    try:
        c.connect(str(path))
    except PermissionError:
        return 0
    return 3


def swap_refused(path: Path, pause: float = 0.0) -> int:
    """Ask the listener at `path` for a swap, `pause` seconds after connecting: 0 if it refuses and says
    why (uid 65534 may not), else 4."""
    c = socket.socket(socket.AF_UNIX)
    c.connect(str(path))
    time.sleep(pause)
    c.sendall(b'{"op": "swap", "channel": "model"}\n')
    a = json.loads(c.makefile().readline())
    return 0 if a["ok"] is False and "uid 65534 may not" in a["error"] else 4


def test_listener_answers_its_own_account_only(home, tmp_path):
    from codemoat.updates.handoff import Listener, hand_over, run_dir

    assert hand_over("model") == []  # no server: nothing to hand over
    seen = []

    def handle(chan):
        seen.append(chan)
        if chan == "adapter:bad":
            raise CodemoatError("adapter bad failed in the running server")
        return {"swapped": True, "version": "2"}

    ln = Listener(handle).start()
    try:
        assert oct(ln.path.stat().st_mode & 0o777) == "0o600" and oct(run_dir().stat().st_mode & 0o777) == "0o700"
        stale = run_dir() / "serve-999999.sock"  # a server that was killed left its socket
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(stale))
        s.close()
        got = hand_over("model")
        assert got == [{"ok": True, "swapped": True, "version": "2", "pid": os.getpid()}]
        assert not stale.exists()
        assert hand_over("adapter:bad")[0] == {
            "ok": False,
            "error": "adapter bad failed in the running server",
            "pid": os.getpid(),
        }
        assert hand_over("../../etc")[0]["ok"] is False and seen == ["model", "adapter:bad"]  # no such channel
        for raw in (b"not json\n", b'{"op": "swap"}\n', b"[" * 70000):
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(ln.path))
            c.sendall(raw + b"\n")
            assert json.loads(c.makefile().readline())["ok"] is False
            c.close()
        if os.getuid() == 0:  # another account cannot even connect (0600), nor swap if it could (SO_PEERCRED)
            assert as_nobody(lambda: cannot_connect(ln.path)) == 0
            # even with every folder and the socket opened up, the peer's uid (SO_PEERCRED) is checked
            import tempfile

            open_home = Path(tempfile.mkdtemp(prefix="handoff-"))
            other = Listener(handle, home=open_home).start()
            os.chmod(open_home, 0o755)
            os.chmod(run_dir(open_home), 0o755)
            os.chmod(other.path, 0o666)
            assert as_nobody(lambda: swap_refused(other.path)) == 0 and seen == ["model", "adapter:bad"]
            other.close()
            shutil.rmtree(open_home)
    finally:
        ln.close()
    assert not ln.path.exists()


@pytest.mark.slow
def test_apply_swaps_the_running_serve_and_a_failed_health_check_rolls_back(shop, serve_process, gguf_file, tmp_path):
    lic = shop.license()
    srv = serve_process(["--model", str(shop.moat), "--license", str(lic)])
    user, admin = create_token("--name", "dev"), create_token("--name", "ops", "--scopes", "admin")
    h = {"Authorization": f"Bearer {admin}"}
    before = httpx.get(f"{srv.url}/health", headers=h).json()
    body = {"model": before["model"], "prompt": "def fibonacci(n):\n", "max_tokens": 8, "temperature": 0.0}
    with Streams(srv.url, user, body, clients=4) as streams:
        r = run_cli("update", "apply", str(shop.release("2")), "--license", str(lic), "--json", timeout=600)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        (a,) = out["served"]
        assert a["ok"] and a["swapped"] and a["version"] == "2" and a["pid"] == srv.proc.pid, out
        after = httpx.get(f"{srv.url}/health", headers=h).json()
        assert after["license"]["license_id"] != before["license"]["license_id"]  # v2, with its own license

        mute = mute_gguf(gguf_file, tmp_path / "mute.gguf")
        line = one_line_error(run_cli("update", "apply", str(shop.release("3", source=mute)), timeout=600))
        assert "installed model 3 (was 2); but server pid" in line and "produced no tokens" in line, line
        assert "the store is back on 2" in line
    stats = streams.stats
    if stats["failed"]:
        print(srv.output()[-3000:])
    assert stats["failed"] == 0 and stats["done"] > 0, stats["errors"][:3]
    assert httpx.get(f"{srv.url}/health", headers=h).json()["license"]["license_id"] == after["license"]["license_id"]
    rows = json.loads(run_cli("update", "list", "--json").stdout)
    assert [(r["version"], r["current"], r.get("status")) for r in rows if r["channel"] == "model"] == [
        ("2", True, None),
        ("3", False, "failed"),
    ]
    assert "produced no tokens" in rows[-1]["reason"]
    recs = [json.loads(x) for x in run_cli("audit", "export", "--kind", "update").stdout.splitlines()]
    steps = [(r["route"], (r["detail"] or {}).get("version") or (r["detail"] or {}).get("failed")) for r in recs]
    for want in (("update swapped", "2"), ("update swap_failed", "3"), ("update swap_rolled_back", "3")):
        assert want in steps, steps

    srv.stop()
    time.sleep(0.5)
    r = run_cli("update", "apply", str(shop.release("4")))  # no server: installs for the next start
    assert r.returncode == 0 and "no server is running on this home: it serves from the next start" in r.stdout, r.stdout
    assert not list((Path(os.environ["CODEMOAT_HOME"]) / "run").glob("serve-*.sock"))  # none left behind


LISTENER = """
import resource, sys
from pathlib import Path
from codemoat.updates.handoff import Listener
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
ln = Listener(lambda chan: {"swapped": True, "version": "2"}, home=Path(sys.argv[1])).start()
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_serve_out_of_descriptors_for_a_moment_still_takes_update_apply(tmp_path):
    """Before: the hand-off listener's accept loop ended on any error, so one accept() failing with EMFILE
    (a serve whose HTTP clients, anyone's, hold all its descriptors for a moment) stopped it for good:
    `update apply` then found the socket's queue full and could not swap. Its own limit here is 64."""
    import subprocess
    import sys

    from codemoat.updates.handoff import hand_over

    home = tmp_path / "home"
    p = subprocess.Popen([sys.executable, "-c", LISTENER, str(home)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        path = str(next((home / "run").glob("serve-*.sock")))
        held = []
        while len(held) < 200:  # each is kept 10 s waiting for its line: past the limit, and the queue
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(0.5)
            for _ in range(10):
                try:
                    s.connect(path)
                    break
                except (BlockingIOError, TimeoutError):  # the queue is full: nobody accepts now
                    time.sleep(0.05)
            else:
                s.close()
                break
            held.append(s)
        assert 64 < len(held) < 200, len(held)
        for s in held:
            s.close()
        for _ in range(40):  # the queue empties as the listener accepts (and drops) the closed ones
            got = hand_over("model", home=home, timeout=30)
            if got[0].get("ok"):
                break
            time.sleep(0.5)
        assert [a.get("ok") for a in got] == [True], got
    finally:
        p.stdin.close()
        p.kill()
        p.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_a_refused_caller_is_told_why_however_slowly_it_asks(tmp_path):
    """Before: the listener refused another uid before reading its request and closed the connection, so
    a caller whose line arrived after that got a broken pipe, not the reason (and the root test above
    failed now and then, its child exiting 5)."""
    import tempfile

    from codemoat.updates.handoff import Listener, run_dir

    open_home = Path(tempfile.mkdtemp(prefix="handoff-"))
    ln = Listener(lambda chan: {"swapped": True}, home=open_home).start()
    try:
        os.chmod(open_home, 0o755)
        os.chmod(run_dir(open_home), 0o755)
        os.chmod(ln.path, 0o666)
        # after half a second the listener has answered and closed, if it does not wait for the line
        assert as_nobody(lambda: swap_refused(ln.path, pause=0.5)) == 0
    finally:
        ln.close()
        shutil.rmtree(open_home)


def test_a_closed_listener_ends_its_accept_thread_and_lets_go_of_the_app(tmp_path):
    """close() closed the unix listener under its accept loop, which Linux does not wake: the thread stayed
    blocked in accept() for good, holding `handle` (serve's: a closure over the whole app, with its database
    connections and audit log), one more for every app a process made and shut down (the test suite's)."""
    import gc
    import threading
    import weakref

    from codemoat.updates.handoff import Listener, hand_over
    from waiting import blocked_in_accept, wait_for

    class App:  # what serve's `handle` closes over
        pass

    app = App()
    before = set(threading.enumerate())
    ln = Listener(lambda channel, app=app: {"swapped": channel}, home=tmp_path).start()
    accepting = [t for t in threading.enumerate() if t not in before and t.name == "update-handoff"]
    assert [a.get("swapped") for a in hand_over("model", home=tmp_path)] == ["model"]  # the positive
    assert len(accepting) == 1 and accepting[0].is_alive()
    assert wait_for(lambda: blocked_in_accept(accepting[0]))  # close() finds it waiting for the next caller
    ref = weakref.ref(app)
    ln.close()
    del ln, app
    accepting[0].join(30)
    assert not accepting[0].is_alive(), "the hand-off's accept thread outlived close()"
    assert wait_for(lambda: gc.collect() is not None and ref() is None)
