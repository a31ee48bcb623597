"""An attacker's view of the sealed holder and the vault daemon (review of issues 19 and 21).

- A customer admin whose offline license expired asks the running server to reload (an adapter
  swap rebuilds the engine through the holder's loader): the loader must refuse, not decrypt again.
- A local process on the vaultd socket sends malformed or hostile messages: vaultd answers each in
  one line and keeps serving everyone else (it serves every replica on the host).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from codemoat.config import load_settings
from codemoat.engines.sealed import open_sealed
from codemoat.errors import CodemoatError, Unavailable
from codemoat.vault.clock import ManualClock
from codemoat.vault.client import VaultClient
from codemoat.vault.daemon import Offer, VaultDaemon
from codemoat.vault.wire import MAX_MESSAGE
from vaulthelp import bundle
from waiting import wait_for


def test_expired_offline_license_is_not_reloaded_by_a_reload_or_an_adapter_swap(vendor, machine, gguf_file, tmp_path):
    from codemoat.engines.loader import swap_adapter

    moat, lic, doc = bundle(vendor, gguf_file, tmp_path / "out", machine, days=1)
    clock = ManualClock()
    settings = load_settings(**{"model.n_ctx": 256, "model.n_threads": 1})
    holder = open_sealed(moat, lic, settings=settings, clock=clock)
    try:
        assert holder.loaded
        holder.load()  # the positive side: a reload while the license holds is fine
        clock.set_wall(doc["license"]["expires"] + 1)
        assert wait_for(lambda: not holder.loaded)
        # the attack: POST /admin/api/model/swap {"adapter": ...} rebuilds through the same loader
        with pytest.raises(Unavailable, match="expired"):
            holder.load()
        with pytest.raises(CodemoatError, match="expired"):
            swap_adapter(holder, settings, "fee")
        assert not holder.loaded
        with pytest.raises(Unavailable, match="expired"):
            holder.get()
    finally:
        holder.close()


@pytest.fixture
def daemon(tmp_path):
    fd = socket.socket()  # any descriptor will do for the protocol: the test reads only the answer
    d = VaultDaemon(tmp_path / "v.sock", allow_uids={__import__("os").getuid()}).start()
    d.offer(Offer("m1", fd.fileno(), 1, {"k": "v"}))
    yield d
    d.close()
    fd.close()


def _raw(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    s.connect(str(path))
    return s


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 60_000,  # nested past Python's recursion limit
        b'{"op": "get", "model": ' + b"[" * 30_000,
        b"\xff\xfe not json",
        b'"just a string"',
        b'{"op": "get", "model": ["m1"]}',
        b'{"op": "get", "model": "../../etc/shadow"}',
    ],
    ids=["deep-array", "deep-model", "binary", "string", "model-list", "model-path"],
)
def test_vaultd_answers_hostile_messages_in_one_line_and_keeps_serving(daemon, payload):
    s = _raw(daemon.path)
    try:
        s.send(payload)
        answer = s.recv(MAX_MESSAGE)
        assert answer, "vaultd closed the connection instead of answering"
        assert b'"ok": false' in answer and b"\n" not in answer
        assert b"Traceback" not in answer
        s.send(b'{"op": "get", "model": "m1"}')  # the same connection still works afterwards
        assert b'"ok": true' in s.recv(MAX_MESSAGE)
    finally:
        s.close()
    got = VaultClient.connect(f"unix:{daemon.path}").fetch("m1")  # and everyone else is served
    assert (got.model_id, got.size) == ("m1", 1)
    __import__("os").close(got.fd)


def test_vaultd_survives_an_oversized_message(daemon):
    s = _raw(daemon.path)
    try:
        s.send(b"{" + b" " * (MAX_MESSAGE * 2) + b"}")
        assert b"too long" in s.recv(MAX_MESSAGE)  # told why (tests/vault/test_vaultd_attacks.py) ...
        try:
            rest = s.recv(MAX_MESSAGE)
        except ConnectionResetError:
            rest = b""
        assert rest == b""  # ... and that connection is closed ...
    finally:
        s.close()
    got = VaultClient.connect(f"unix:{daemon.path}").fetch("m1")  # ... and vaultd serves on
    assert got.model_id == "m1"
    __import__("os").close(got.fd)


def test_a_refused_caller_cannot_hold_a_vaultd_thread_by_talking(tmp_path):
    """A member of the socket's group who is not on the allow-list is told no and cut off, however
    long it keeps sending (each connection holds a thread of the daemon that serves every replica)."""
    import os
    import time

    other = os.getuid() + 4242  # only that uid is allowed: this process is refused
    d = VaultDaemon(tmp_path / "v.sock", allow_uids={other}).start()
    try:
        s = _raw(d.path)
        s.settimeout(1)
        answer = s.recv(MAX_MESSAGE)
        assert b"not allowed" in answer
        cut_off = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not cut_off:
            try:  # vaultd shut its side at once; a send fails only once it closed the connection too
                s.send(b'{"op": "get", "model": "m1"}')
                time.sleep(0.2)
            except OSError:
                cut_off = True
        s.close()
        assert cut_off, "vaultd kept reading from a refused caller"
    finally:
        d.close()


def test_a_second_swap_while_one_is_loading_is_refused_and_the_adapter_list_stays_true(tmp_path):
    """Two admins (or one, twice) swap at once: before, both edited `model.adapters` and could leave an
    adapter that failed its health check in the list that the next reload (a regained lease) serves."""
    import threading

    from codemoat.engines.holder import ModelHolder
    from codemoat.engines.loader import swap_adapter

    entered, release, calls = threading.Event(), threading.Event(), []

    def loader():
        calls.append(len(calls))
        if len(calls) == 1:
            entered.set()
            release.wait(30)
        raise CodemoatError("this load fails its health check")

    holder = ModelHolder("m", loader)
    settings = load_settings()
    settings.model.adapters = []
    errors: list[str] = []

    def first() -> None:
        try:
            swap_adapter(holder, settings, "a")
        except CodemoatError as e:
            errors.append(str(e))

    t = threading.Thread(target=first)
    t.start()
    try:
        assert entered.wait(30)
        with pytest.raises(CodemoatError, match="in progress"):
            swap_adapter(holder, settings, "b")
        assert calls == [0]  # the second swap loaded nothing
    finally:
        release.set()
        t.join(30)
    assert errors == ["this load fails its health check"] and settings.model.adapters == []
    with pytest.raises(CodemoatError, match="health check"):  # once it is over, the next swap may run
        swap_adapter(holder, settings, "b")
    assert settings.model.adapters == []


SQUATTER = r"""
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind(sys.argv[1]); s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
c.recv(65536)
fd = os.memfd_create("evil")
os.write(fd, b"GGUF attacker's model")
socket.send_fds(c, [json.dumps({"ok": True, "model": "acme-coder", "size": 21, "facts": {},
                               "watermark_key": "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE="}).encode()], [fd])
c.recv(1)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the squatter as another user")
def test_serve_refuses_a_socket_squatted_by_another_user(tmp_path):
    """A local user creates the socket first in a world-writable folder (before vaultd starts, or
    after it stops): serve must not take a model and watermark key from that user's process."""
    import shutil
    import subprocess
    import tempfile

    from codemoat.vault.wire import VaultdError

    folder = Path(tempfile.mkdtemp(prefix="cm-squat-", dir="/tmp"))
    os.chmod(folder, 0o1777)
    sock = folder / "vault.sock"
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin:/bin")  # one that user 65534 may run
    if python is None:
        pytest.skip("no system python3 for the squatter")
    p = subprocess.Popen([python, "-c", SQUATTER, str(sock)], user=65534, group=65534, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        with pytest.raises(VaultdError, match="uid 65534"):
            VaultClient.connect(f"unix:{sock}").fetch("acme-coder")
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(folder, ignore_errors=True)
    # the positive side: a daemon of this user, or of the folder's owner, is trusted
    d = VaultDaemon(tmp_path / "v.sock", allow_uids={os.getuid()}).start()
    try:
        d.offer(Offer("m1", os.memfd_create("m1"), 0))
        got = VaultClient.connect(f"unix:{d.path}").fetch("m1")
        os.close(got.fd)
    finally:
        d.close()
