"""Under `serve --vault`, a model bundle `update apply` (or `update rollback`) installs in vaultd's home is
taken in by vaultd without a restart: vaultd verifies it, decrypts it once into a new sealed memfd, lets
its old copy go, and the connected serves swap to it (/health's `bundle` names the new version). A
caller of another account cannot trigger it, and a version with a bad license signature or another
customer's is refused while vaultd and its serves go on with the old one."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from updhelp import Streams, Vaultd, one_line_error, run_cli


def _bundle(url: str, token: str) -> str | None:
    b = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {token}"}, timeout=60).json()["bundle"]
    return b["version"] if b else None


def _wait_bundle(url: str, token: str, version: str | None, timeout: float = 180) -> str | None:
    deadline = time.time() + timeout
    while (got := _bundle(url, token)) != version and time.time() < deadline:
        time.sleep(0.3)
    return got


def _model_memfds(pid: int) -> int:
    """How many model memfds (distinct files) `pid` and its children hold open or mapped."""
    pids, seen = [pid], set()
    for p in pids:
        try:
            pids += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
            fds = os.listdir(f"/proc/{p}/fd")
            maps = Path(f"/proc/{p}/maps").read_text().splitlines()
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{p}/fd/{fd}").startswith("/memfd:codemoat-tiny"):
                    seen.add(os.stat(f"/proc/{p}/fd/{fd}").st_ino)
            except OSError:
                pass
        seen.update(int(ln.split()[4]) for ln in maps if "/memfd:codemoat-tiny" in ln)
    return len(seen)


def _wait_memfds(pid: int, n: int, timeout: float = 60) -> int:
    deadline = time.time() + timeout
    while (got := _model_memfds(pid)) != n and time.time() < deadline:
        time.sleep(0.3)
    return got


def _serve_vault(serve_process, vaultd: Vaultd, tmp_path: Path):
    serve_home = tmp_path / "serve-home"  # serve's own home: only vaultd hears `update apply` in vaultd's
    env = {"CODEMOAT_HOME": str(serve_home)}
    r = run_cli("tokens", "create", "--json", "--name", "dev", env=env)
    token = json.loads(r.stdout)["token"]
    return serve_process(["--vault", f"unix:{vaultd.sock}", "--model", "tiny"], env=env), token


def _complete(url: str, token: str) -> None:
    body = {"model": "tiny", "prompt": "def add(a, b):\n    return", "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text


@pytest.mark.slow
def test_a_model_update_in_vaultds_home_reaches_serve_vault_without_a_restart(shop, serve_process, tmp_path):
    lic = shop.license()
    with Vaultd(tmp_path / "v.sock", shop.moat, lic) as vaultd:
        srv, token = _serve_vault(serve_process, vaultd, tmp_path)
        assert _bundle(srv.url, token) is None  # vaultd was started with a .moat file
        assert _model_memfds(vaultd.proc.pid) == 1

        body = {"model": "tiny", "prompt": "def add(a, b):\n    return", "max_tokens": 16, "temperature": 0}
        with Streams(srv.url, token, body, clients=2) as streams:
            for v in ("2", "3"):
                r = run_cli("update", "apply", str(shop.release(v)), "--license", str(lic), "--json", timeout=300)
                assert r.returncode == 0, r.stderr
                (a,) = json.loads(r.stdout)["served"]  # vaultd's answer: it took v in and told its one serve
                assert a["ok"] and a["relayed"] == 1 and a["version"] == v and a["pid"] == vaultd.proc.pid, a
                assert _wait_bundle(srv.url, token, v) == v, srv.output()[-2000:]
                assert _model_memfds(vaultd.proc.pid) == 1  # the old copy let go: vaultd holds the new one only
            r = run_cli("update", "rollback", "--json", timeout=300)
            assert r.returncode == 0, r.stderr
            assert _wait_bundle(srv.url, token, "2") == "2", srv.output()[-2000:]
        stats = streams.stats
        assert stats["failed"] == 0 and stats["done"] > 0, stats["errors"][:3]
        assert vaultd.proc.poll() is None and _model_memfds(vaultd.proc.pid) == 1
        assert _wait_memfds(srv.proc.pid, 1) == 1  # the serve let the old versions go once they drained
        _complete(srv.url, token)
        recs = [
            json.loads(x)
            for x in run_cli(
                "audit", "export", "--kind", "update", env={"CODEMOAT_HOME": str(tmp_path / "serve-home")}
            ).stdout.splitlines()
        ]
        swaps = [x["detail"]["version"] for x in recs if x["route"] == "update swapped" and x["detail"].get("via") == "vaultd"]
        assert swaps == ["2", "3", "2"], recs


def _notify_as(uid: int, path: Path) -> int:
    """A child of uid `uid` asks vaultd's hand-off socket to swap the model: 0 when it was refused."""
    pid = os.fork()
    if pid == 0:
        code = 5
        try:
            os.setuid(uid)
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(path))
            c.sendall(b'{"op": "swap", "channel": "model"}\n')
            a = json.loads(c.makefile().readline())
            code = 0 if a["ok"] is False and f"uid {uid} may not" in a["error"] else 4
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_another_account_cannot_make_vaultd_swap_and_a_bad_or_foreign_version_is_refused(shop, store, serve_process, tmp_path):
    from codemoat.updates.handoff import hand_over, run_dir

    lic = shop.license()
    store.apply(shop.release("2"), lic)  # installed, nobody told: vaultd and its serve are on the .moat file
    with Vaultd(tmp_path / "v.sock", shop.moat, lic) as vaultd:
        srv, token = _serve_vault(serve_process, vaultd, tmp_path)
        (sock,) = run_dir().glob("vaultd-*.sock")
        # even with the socket opened up (a link in a folder anyone may enter), the kernel's word on the
        # caller's uid decides
        open_dir = Path(tempfile.mkdtemp(prefix="vaultd-"))
        try:
            os.chmod(open_dir, 0o755)
            os.link(sock, open_dir / "v.sock")
            os.chmod(sock, 0o666)
            assert _notify_as(65534, open_dir / "v.sock") == 0
        finally:
            shutil.rmtree(open_dir)
        time.sleep(2)
        assert _bundle(srv.url, token) is None  # not swapped

        cur = Path(store.current("model")["dir"])
        good = {n: (cur / n).read_bytes() for n in ("model.moat", "model.lic")}
        doc = json.loads(good["model.lic"])
        sig = doc["signature"]
        doc["signature"] = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
        (cur / "model.lic").write_text(json.dumps(doc))
        (a,) = hand_over("model")
        assert not a["ok"] and "vaultd refused model 2" in a["error"], a

        other = shop.license(customer="globex")  # a valid license for this machine, of another customer
        shutil.copyfile(shop.folder / "globex.moat", cur / "model.moat")
        shutil.copyfile(other, cur / "model.lic")
        (a,) = hand_over("model")
        assert not a["ok"] and "licensed to 'globex'" in a["error"], a
        assert _model_memfds(vaultd.proc.pid) == 1  # the refused copy is not kept
        assert _bundle(srv.url, token) is None
        _complete(srv.url, token)  # the old model serves on

        for n, data in good.items():
            (cur / n).write_bytes(data)
        (a,) = hand_over("model")  # the same notice from vaultd's own account: taken in
        assert a["ok"] and a["relayed"] == 1, a
        assert _wait_bundle(srv.url, token, "2") == "2", srv.output()[-2000:]


class InstalledVaultd(Vaultd):
    """`codemoat vaultd --model update:model`: the installed model bundle with its own license."""

    def __init__(self, sock: Path):
        cmd = [sys.executable, "-m", "codemoat.cli.main", "vaultd", "--socket", f"unix:{sock}", "--model", "update:model"]
        self.sock = sock
        self.proc = subprocess.Popen(
            [*cmd, "--allow-uid", str(os.getuid())], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )


@pytest.mark.slow
def test_vaultd_started_on_the_installed_model_serves_its_current_version(shop, store, serve_process, tmp_path):
    line = one_line_error(
        run_cli("vaultd", "--socket", f"unix:{tmp_path / 'v.sock'}", "--model", "update:model", "--allow-uid", "0")
    )
    assert "no model bundle is installed" in line, line
    lic = shop.license()
    store.apply(shop.release("2"), lic)
    with InstalledVaultd(tmp_path / "v.sock") as vaultd:
        srv, token = _serve_vault(serve_process, vaultd, tmp_path)
        assert _bundle(srv.url, token) == "2"
        r = run_cli("update", "apply", str(shop.release("3")), "--json", timeout=300)
        assert r.returncode == 0, r.stderr
        assert _wait_bundle(srv.url, token, "3") == "3", srv.output()[-2000:]
    with InstalledVaultd(tmp_path / "v.sock") as vaultd:  # a restart serves what is installed now
        srv, token = _serve_vault(serve_process, vaultd, tmp_path)
        assert _bundle(srv.url, token) == "3"
