"""A local user on the serving host who is not the service account (another uid, no root): what they can
reach of a running `codemoat serve` with a sealed model, tried for real as uid 65534 (the test runs
as root; skipped otherwise).

Held: $CODEMOAT_HOME (0700: the machine key, the clock record, the databases, the update hand-off
socket), the server's and the engine process's /proc entries that hold secrets or the plaintext
(environ, fd, map_files, mem: both processes are non-dumpable), the sealed memfd by any name. What
every user may read, /proc/PID/cmdline, holds no secret: the engine process gets its settings over a
socket pair, not in argv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from conftest import create_token
from vaulthelp import bundle

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="becoming another uid takes root"),
    pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="the stranger runs the system's python3"),
]

STRANGER = 65534

# What the stranger runs: each attempt is (label, what it did); "refused" unless it got something.
PROBE = r"""
import json, os, socket, stat, sys
home, pids = sys.argv[1], json.loads(sys.argv[2])
out = {}
def attempt(label, fn):
    try:
        got = fn()
        out[label] = "GOT " + repr(got)[:200]
    except PermissionError:
        out[label] = "refused"
    except OSError as e:
        out[label] = "refused " + type(e).__name__
def read(p):
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)  # a pipe or socket must not hang the probe
    try:
        return os.read(fd, 64) if stat.S_ISREG(os.fstat(fd).st_mode) else "opened"
    finally:
        os.close(fd)
attempt("home listing", lambda: os.listdir(home))
for name in ("machine.key", "clock.json", "codemoat.db", "index.db"):
    attempt("home " + name, lambda: read(os.path.join(home, name)))
def handoff():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(os.path.join(home, "run", "serve-%d.sock" % pids["server"]))
    return "connected"
attempt("handoff socket", handoff)
for who, pid in pids.items():
    for entry in ("environ", "mem", "maps", "auxv", "stack"):
        attempt(who + " " + entry, lambda: read("/proc/%d/%s" % (pid, entry)))
    for entry in ("fd", "map_files", "fdinfo"):
        attempt(who + " " + entry, lambda: os.listdir("/proc/%d/%s" % (pid, entry)))
    for fd in range(64):
        try:
            out["%s fd %d" % (who, fd)] = "GOT " + repr(read("/proc/%d/fd/%d" % (pid, fd))[:16])
        except OSError:
            pass
cmdlines = {}
for who, pid in pids.items():
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        cmdlines[who] = f.read().decode(errors="replace")
print(json.dumps({"attempts": out, "cmdlines": cmdlines}))
"""


@pytest.fixture
def open_home(monkeypatch):
    """$CODEMOAT_HOME in a folder every user may pass through (0711), so that only the home's own mode keeps
    the stranger out (the tests' own temp folders are 0700, which would hide a loose home)."""
    top = Path(tempfile.mkdtemp(prefix="codemoat-local-user-", dir="/tmp"))
    top.chmod(0o711)
    home = top / "home"
    monkeypatch.setenv("CODEMOAT_HOME", str(home))
    yield home
    shutil.rmtree(top, ignore_errors=True)


def test_another_local_user_gets_no_key_no_weights_and_no_secret_from_proc(
    open_home, vendor, machine, gguf_file, tmp_path, serve_process
):
    from codemoat.vault.machine import MachineKey

    machine = MachineKey.load_or_create()  # the key of this home (open_home comes first: the same as the fixture's)
    moat, lic, _ = bundle(vendor, gguf_file, tmp_path / "out", machine)
    srv = serve_process(["--model", str(moat), "--license", str(lic)], env={"CODEMOAT_MODEL__N_CTX": "256"})
    admin = create_token("--name", "ops", "--scopes", "admin")
    health = httpx.get(f"{srv.url}/health", headers={"Authorization": f"Bearer {admin}"}, timeout=30).json()
    assert health["license"]["customer"] == "acme"
    children = []  # the engine process, whichever of the server's threads started it
    for task in Path(f"/proc/{srv.proc.pid}/task").iterdir():
        try:
            children += (task / "children").read_text().split()
        except OSError:  # a thread that ended while we looked
            pass
    assert children, "the engine runs in a process of its own"
    pids = {"server": srv.proc.pid, "engine": int(children[0])}
    r = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", PROBE, str(open_home), json.dumps(pids)],
        user=STRANGER,
        group=STRANGER,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    got = {k: v for k, v in seen["attempts"].items() if v.startswith("GOT")}
    assert got == {}, got
    assert len(seen["attempts"]) >= 20  # the probe ran every attempt
    secrets_ = [v for v in (open_home / "machine.key").read_text().split('"') if len(v) >= 16] + [admin]
    for who, line in seen["cmdlines"].items():
        assert line, who  # readable by design: and nothing in it is secret
        assert not any(s in line for s in secrets_), (who, line)
