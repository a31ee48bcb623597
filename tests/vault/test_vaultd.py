"""Privilege separation: `codemoat vaultd` holds the key and hands `serve` only a sealed memfd.

The protocol tests run as any user. The end-to-end tests need root (CI runs as root): they make
throw-away system users, run vaultd as one and `codemoat serve --vault` as the other, and prove
that serve's uid cannot read the key, license or container, is refused unless allow-listed,
gets the model only through vaultd, and unloads (503) when the license is revoked."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from procfs import fd_targets
import pytest

from codemoat.engines.memfd import MemfdBuffer
from codemoat.errors import CodemoatError
from codemoat.vault.client import VaultClient
from codemoat.vault.daemon import Offer, VaultDaemon
from codemoat.vault.wire import VaultdError
from .conftest import KeyServerProcess, free_port
from vaulthelp import bundle, cli, one_line_error

SEALS = 0x0001 | 0x0002 | 0x0004  # SEAL, SHRINK, GROW (and FUTURE_WRITE or WRITE, checked apart)


# -- the protocol, as whoever runs the tests ------------------------------------------------------
@pytest.fixture
def offered(tmp_path, gguf_file):
    data = gguf_file.read_bytes()
    buf = MemfdBuffer.from_bytes(data, name="test-model")
    yield buf, data
    buf.close()


WM_KEY = bytes(range(32))


def start_daemon(tmp_path, buf, **allow) -> VaultDaemon:
    d = VaultDaemon(tmp_path / "vault.sock", **allow).start()
    d.offer(Offer("acme-coder", buf.fd, buf.size, {"parts": {"model.gguf": [0, buf.size]}}, watermark_key=lambda: WM_KEY))
    d.offer(Offer("unmarked", buf.fd, buf.size, {}))
    return d


def test_allowed_uid_gets_the_sealed_memfd(tmp_path, offered):
    buf, data = offered
    d = start_daemon(tmp_path, buf, allow_uids={os.getuid()})
    try:
        assert oct(os.stat(d.path).st_mode & 0o777) == "0o660"
        got = VaultClient.connect(f"unix:{d.path}").fetch("acme-coder")
        assert got.size == len(data) and "key" not in json.dumps(got.facts).lower()
        assert got.watermark_key == WM_KEY and WM_KEY.hex() not in repr(got)  # serve marks outputs; never in a repr
        plain = VaultClient.connect(f"unix:{d.path}").fetch("unmarked")
        assert plain.watermark_key is None  # a license without a watermark: nothing is sent
        os.close(plain.fd)
        adopted = MemfdBuffer.adopt(got.fd, got.size)
        assert hashlib.sha256(adopted.view).digest() == hashlib.sha256(data).digest()
        assert adopted.seals() & SEALS == SEALS
        with pytest.raises(OSError):  # the seal holds in the receiver: no write, no resize
            os.pwrite(adopted.fd, b"x", 0)
        with pytest.raises(OSError):
            os.ftruncate(adopted.fd, 1)
        adopted.close()
        assert buf.view[:4] == data[:4]  # the receiver's close never zeroes the daemon's copy
        with pytest.raises(VaultdError, match="not available: no such model"):
            VaultClient.connect(f"unix:{d.path}").fetch("other")
    finally:
        d.close()


def test_uid_not_on_the_list_is_refused(tmp_path, offered):
    buf, _ = offered
    d = start_daemon(tmp_path, buf, allow_uids={os.getuid() + 4242})
    try:
        with pytest.raises(VaultdError) as e:
            VaultClient.connect(f"unix:{d.path}").fetch("acme-coder")
        assert f"uid {os.getuid()} is not allowed" in str(e.value) and "\n" not in str(e.value)
    finally:
        d.close()


def test_revocation_reaches_a_connected_client(tmp_path, offered):
    buf, _ = offered
    d = start_daemon(tmp_path, buf, allow_uids={os.getuid()})
    try:
        c = VaultClient.connect(d.path)
        os.close(c.fetch("acme-coder").fd)
        seen: list = []
        c.watch(seen.append, lambda why: seen.append({"lost": why}))
        d.revoke("acme-coder", "license L1 revoked")
        deadline = time.time() + 10
        while not seen and time.time() < deadline:
            time.sleep(0.02)
        assert seen == [{"op": "revoke", "model": "acme-coder", "reason": "license L1 revoked"}]
        with pytest.raises(VaultdError, match="license L1 revoked"):  # and it is not handed out again
            VaultClient.connect(d.path).fetch("acme-coder")
    finally:
        d.close()


def test_a_closed_vault_holder_hangs_up(tmp_path, offered):
    """`serve --vault`'s model holder gives its vaultd connection back when it closes. Before, the
    connection (and its vaultd thread) stayed until the process ended, so a process that loads and
    closes models through vaultd (a bench, a supervisor) was refused at the per-uid cap."""
    from codemoat.config import load_settings
    from codemoat.engines.loader import open_model

    buf, _ = offered
    d = start_daemon(tmp_path, buf, allow_uids={os.getuid()}, max_conns_per_uid=2)
    settings = load_settings(
        **{"vault.socket": f"unix:{d.path}", "model.id": "unmarked", "model.n_ctx": 128, "model.isolation": "inline"}
    )
    try:
        for _ in range(3):
            holder = open_model(settings)
            assert holder.loaded
            holder.close()
    finally:
        d.close()


def test_adopt_refuses_an_unsealed_or_wrong_sized_file():
    fd = os.memfd_create("plain", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    with pytest.raises(ValueError, match="not a sealed model file"):
        MemfdBuffer.adopt(fd, 4096)  # writable: a sender could change the weights under us
    ok = MemfdBuffer.from_bytes(b"x" * 4096)
    with pytest.raises(ValueError, match="not a sealed model file"):
        MemfdBuffer.adopt(os.dup(ok.fd), 8192)
    ok.close()


def test_socket_spec_must_be_unix():
    with pytest.raises(CodemoatError, match="give unix:PATH"):
        VaultClient.connect("tcp:127.0.0.1:9")
    with pytest.raises(VaultdError, match="cannot reach the vault daemon"):
        VaultClient.connect("unix:/nonexistent/vault.sock")


def test_bad_input_is_one_line(tmp_path):
    sock = f"unix:{tmp_path}/v.sock"
    assert "give --allow-uid or --allow-group" in one_line_error(
        cli("vaultd", "--socket", sock, "--model", "a.moat", "--license", "a.lic")
    )
    assert "no such user" in one_line_error(
        cli("vaultd", "--socket", sock, "--model", "a.moat", "--license", "a.lic", "--allow-uid", "nosuch-user-x")
    )
    assert "one --license per --model" in one_line_error(
        cli("vaultd", "--socket", sock, "--model", "a.moat", "--model", "b.moat", "--license", "a.lic", "--allow-uid", "0")
    )
    assert "cannot reach the vault daemon" in one_line_error(
        cli("serve", "--vault", sock, "--model", "acme-coder", "--port", "0")
    )
    assert "give unix:PATH" in one_line_error(cli("serve", "--vault", "tcp:127.0.0.1:9", "--model", "m", "--port", "0"))
    base = ("vaultd", "--socket", sock, "--model", "a.moat", "--license", "a.lic")
    assert "give NAME, or MODEL_ID=NAME" in one_line_error(cli(*base, "--allow-uid", "=root"))
    assert "--allow-uid nosuch-user-x: no such user" in one_line_error(cli(*base, "--allow-uid", "acme=nosuch-user-x"))
    # Unicode digits ('²' passes str.isdigit(), int() refuses it: a traceback before) are names, and no such name
    assert "--allow-uid ²: no such user" in one_line_error(cli(*base, "--allow-uid", "²"))
    assert "--allow-group ١٢: no such group" in one_line_error(cli(*base, "--allow-group", "١٢"))
    assert "--socket-group nosuch-group-x: no such group" in one_line_error(
        cli(*base, "--allow-uid", "0", "--socket-group", "nosuch-group-x")
    )


def test_a_model_scoped_entry_must_name_a_model_vaultd_holds(vendor, machine, gguf_file, tmp_path):
    """A typo in `--allow-uid MODEL_ID=USER` would leave the model nobody may fetch: refused at start."""
    moat, lic, _ = bundle(vendor, gguf_file, tmp_path / "b", machine)
    sock = tmp_path / "v.sock"
    line = one_line_error(
        cli("vaultd", "--socket", f"unix:{sock}", "--model", str(moat), "--license", str(lic), "--allow-uid", "acme-codr=0")
    )
    assert "--allow-uid/--allow-group acme-codr=...: vaultd holds no such model" in line
    assert not sock.exists()


# -- two accounts, as in production ---------------------------------------------------------------
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make throw-away system users (CI runs as root)")


def _python_for(user: pwd.struct_passwd) -> tuple[list[str], dict[str, str]]:
    """An interpreter the user can run, with this venv's packages (the venv's may sit under /root)."""
    import codemoat

    src = str(Path(codemoat.__file__).resolve().parents[1])
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {"PYTHONPATH": os.pathsep.join([src, *site])}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        try:
            ok = (
                exe
                and subprocess.run(
                    [exe, "-c", "import codemoat.cli.main"],
                    user=user.pw_uid,
                    group=user.pw_gid,
                    extra_groups=[],
                    env=dict(os.environ, **env),
                    capture_output=True,
                ).returncode
                == 0
            )
        except OSError:  # not executable by that user
            ok = False
        if ok:
            return [exe], env
    pytest.skip("no Python interpreter that a system user may run")


@pytest.fixture
def accounts():
    """Two throw-away system users (vault, serve), both in a third group that may use the socket."""
    import grp

    tag = f"{os.getpid() % 100000}{os.urandom(2).hex()}"
    subprocess.run(["groupadd", "--system", f"cmcl{tag}"], check=True, capture_output=True)
    made = []
    for role in ("vd", "sv"):
        subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "-G",
                f"cmcl{tag}",
                f"cm{role}{tag}",
            ],
            check=True,
            capture_output=True,
        )
        made.append(pwd.getpwnam(f"cm{role}{tag}"))
    yield (*made, grp.getgrnam(f"cmcl{tag}"))
    for u in made:
        subprocess.run(["userdel", u.pw_name], capture_output=True)
    subprocess.run(["groupdel", f"cmcl{tag}"], capture_output=True)


def chown_tree(path: Path, user: pwd.struct_passwd, mode: int = 0o700) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, user.pw_uid, user.pw_gid)
    path.chmod(mode)


class Setup:
    """The vault account's home (machine key 0600), its license and container, serve's home and a token."""

    def __init__(self, vendor, gguf_file, accounts, monkeypatch, **issue):
        vault, serve, self.clients = accounts
        self.vault, self.serve = vault, serve
        self.base = Path(tempfile.mkdtemp(prefix="codemoat-vaultd-", dir="/tmp"))
        self.base.chmod(0o755)
        self.vault_home, self.serve_home, self.run = self.base / "vault", self.base / "serve", self.base / "run"
        for d in (self.vault_home, self.serve_home, self.run):
            d.mkdir()
        monkeypatch.setenv("CODEMOAT_HOME", str(self.vault_home))
        from codemoat.vault.container import SealedFile
        from codemoat.vault.machine import MachineKey

        machine = self.machine = MachineKey.load_or_create()
        self.moat, self.lic, self.doc = bundle(vendor, gguf_file, self.vault_home / "models", machine, **issue)
        self.model_id = SealedFile(self.moat).manifest.model_id
        monkeypatch.setenv("CODEMOAT_HOME", str(self.serve_home))
        r = subprocess.run(
            [sys.executable, "-m", "codemoat.cli.main", "tokens", "create", "--name", "dev", "--json"],
            capture_output=True,
            text=True,
            env=dict(os.environ),
        )
        assert r.returncode == 0, r.stderr
        self.token = json.loads(r.stdout)["token"]
        chown_tree(self.vault_home, vault)
        chown_tree(self.serve_home, serve)
        chown_tree(self.run, vault, 0o755)
        self.sock = self.run / "vault.sock"
        self.procs: list[subprocess.Popen] = []

    def spawn(self, user, home: Path, *args: str, wait: bool = False) -> subprocess.Popen:
        exe, extra = _python_for(user)
        env = dict(
            os.environ,
            CODEMOAT_HOME=str(home),
            TMPDIR=str(home),
            CODEMOAT_MODEL__N_CTX="256",
            CODEMOAT_MODEL__N_THREADS="1",
            **extra,
        )
        env.pop("CODEMOAT_DEBUG", None)
        log = open(home / f"log-{len(self.procs)}.txt", "w+")
        p = subprocess.Popen(
            [*exe, "-m", "codemoat.cli.main", *args],
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[self.clients.gr_gid],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(home),
        )
        p.log = log  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def run_as(self, user, code: str) -> subprocess.CompletedProcess:
        exe, extra = _python_for(user)
        return subprocess.run(
            [*exe, "-c", code],
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            env=dict(os.environ, **extra),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def vaultd(self) -> subprocess.Popen:
        p = self.spawn(
            self.vault,
            self.vault_home,
            "vaultd",
            "--socket",
            f"unix:{self.sock}",
            "--model",
            str(self.moat),
            "--license",
            str(self.lic),
            "--allow-uid",
            self.serve.pw_name,
            "--allow-group",
            self.clients.gr_name,
        )
        deadline = time.time() + 60
        while not self.sock.is_socket():
            assert p.poll() is None and time.time() < deadline, output(p)
            time.sleep(0.1)
        return p

    def serve_proc(self) -> tuple[subprocess.Popen, str]:
        port = free_port()
        p = self.spawn(
            self.serve,
            self.serve_home,
            "serve",
            "--vault",
            f"unix:{self.sock}",
            "--model",
            self.model_id,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            assert p.poll() is None, output(p)
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return p, url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(output(p))

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(self.base, ignore_errors=True)


def output(p: subprocess.Popen) -> str:
    p.log.flush()
    p.log.seek(0)
    return p.log.read()


def process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:  # a thread that ends while we look (vaultd's per-connection threads do) has no children file
            for task in Path(f"/proc/{p}/task").iterdir():
                try:
                    todo += [int(c) for c in (task / "children").read_text().split()]
                except FileNotFoundError:
                    pass
        except FileNotFoundError:
            pass
    return out


def secrets_seen(pid: int, secrets: dict[str, bytes]) -> list[str]:
    """Which secrets appear in the command line, environment or readable memory of `pid` or its children (root reads /proc/PID/mem)."""
    seen = set()
    for p in process_tree(pid):
        try:  # a process that exits while we look (a short-lived helper of serve's) holds nothing any more
            blobs = [Path(f"/proc/{p}/cmdline").read_bytes(), Path(f"/proc/{p}/environ").read_bytes()]
            with open(f"/proc/{p}/mem", "rb", 0) as mem:
                for line in Path(f"/proc/{p}/maps").read_text().splitlines():
                    span, perm = line.split()[:2]
                    if "r" not in perm or line.endswith(("[vvar]", "[vsyscall]")):
                        continue
                    lo, hi = (int(x, 16) for x in span.split("-"))
                    try:
                        mem.seek(lo)
                        blobs.append(mem.read(hi - lo))
                    except OSError:
                        continue
        except (FileNotFoundError, ProcessLookupError):
            continue
        for name, secret in secrets.items():
            import base64

            forms = (secret, secret.hex().encode(), base64.b64encode(secret), base64.urlsafe_b64encode(secret).rstrip(b"="))
            if any(f in b for b in blobs for f in forms):
                seen.add(name)
    return sorted(seen)


def watermarked_through_vaultd(setup: Setup, vendor, gguf_file: Path, proc: subprocess.Popen, url: str) -> None:
    """What serve got from vaultd marks its completions with the customer's watermark (`watermark detect`
    names acme), while serve and its engine hold neither the content key nor the machine key."""
    from codemoat.vault.codec import ed_private_raw, unwrap, x_private_raw
    from codemoat.vault.license import License, key_context

    auth = {"Authorization": f"Bearer {setup.token}"}
    texts = []
    for seed in range(20):  # a random model often stops early: enough text to score a few hundred tokens
        body = {"model": setup.model_id, "prompt": "def main(", "max_tokens": 180, "temperature": 1.0, "top_p": 1.0, "seed": seed}
        r = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=120)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    gen = setup.base / "generated.txt"
    gen.write_text("\n".join(texts))
    r = subprocess.run(
        [sys.executable, "-m", "codemoat.cli.main", "watermark", "detect", str(gen), "--vendor", str(vendor.root)]
        + ["--customer", "acme", "--model", str(gguf_file), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"][0]["detected"] == ["acme"], r.stdout

    m, b = setup.machine, License.load(setup.lic).body
    content_key = unwrap(m.x25519, b["keys"]["content_key"], key_context("content-key", b["id"]), "content key")
    secrets = {
        "content key": content_key,
        "machine X25519": x_private_raw(m.x25519),
        "machine Ed25519": ed_private_raw(m.ed25519),
    }
    assert secrets_seen(proc.pid, secrets) == []
    vaultd = next(p for p in setup.procs if p.args[-1] == setup.clients.gr_name)
    assert secrets_seen(vaultd.pid, secrets) != []  # the scan finds a key where one is held


def readable(setup: Setup, user, *files: Path) -> dict[str, bool]:
    code = (
        "import json\nout={}\nfor f in %r:\n    try:\n        open(f,'rb').read(1); out[f]=True\n"
        "    except OSError:\n        out[f]=False\nprint(json.dumps(out))" % [str(f) for f in files]
    )
    r = setup.run_as(user, code)
    assert r.returncode == 0, r.stderr
    return {Path(k).name: v for k, v in json.loads(r.stdout).items()}


@root_only
@pytest.mark.slow
def test_serve_account_gets_the_model_only_through_vaultd_and_unloads_on_revocation(vendor, gguf_file, accounts, monkeypatch):
    from openai import APIStatusError, OpenAI

    vault, serve, clients = accounts
    ks = KeyServerProcess(vendor).start()
    # a TTL long enough that a busy machine does not lose the lease before the revocation is seen
    setup = Setup(vendor, gguf_file, accounts, monkeypatch, mode="lease", keyserver=ks.url, lease_ttl=10, grace=5)
    try:
        secrets = (setup.vault_home / "machine.key", setup.lic, setup.moat)
        assert oct((setup.vault_home / "machine.key").stat().st_mode & 0o777) == "0o600"
        assert readable(setup, vault, *secrets) == {"machine.key": True, setup.lic.name: True, "acme.moat": True}
        assert readable(setup, serve, *secrets) == {"machine.key": False, setup.lic.name: False, "acme.moat": False}

        # without vaultd, serve's account cannot open the sealed model itself
        direct = setup.spawn(
            serve, setup.serve_home, "serve", "--model", str(setup.moat), "--license", str(setup.lic), "--port", str(free_port())
        )
        assert direct.wait(timeout=120) == 1
        assert "Traceback" not in output(direct) and "error:" in output(direct)

        vd = setup.vaultd()
        assert oct(setup.sock.stat().st_mode & 0o777) == "0o660" and setup.sock.stat().st_gid == clients.gr_gid
        with pytest.raises(VaultdError, match="uid 0 is not allowed"):  # root is not on the list: SO_PEERCRED
            VaultClient.connect(f"unix:{setup.sock}").fetch(setup.model_id)

        proc, url = setup.serve_proc()
        client = OpenAI(base_url=f"{url}/v1", api_key=setup.token, max_retries=0)
        out = client.completions.create(model=setup.model_id, prompt="def add(a, b):\n", max_tokens=8, temperature=0)
        assert out.choices[0].text
        health = httpx.get(url + "/health", headers={"Authorization": f"Bearer {setup.token}"}).json()
        assert health["license"]["license_id"] == setup.doc["license"]["id"]
        maps = Path(f"/proc/{proc.pid}/maps").read_text() + "".join(fd_targets(proc.pid))
        assert "machine.key" not in maps and "acme.moat" not in maps

        vendor.revoke(setup.doc["license"]["id"])
        deadline = time.time() + 40  # vaultd's next renewal is due within TTL/2 = 5 s
        while time.time() < deadline:
            try:
                client.completions.create(model=setup.model_id, prompt="x", max_tokens=1)
            except APIStatusError as e:
                assert e.status_code == 503 and "revoked" in e.response.json()["error"]["message"]
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"serve kept serving after revocation:\n{output(vd)}\n{output(proc)}")
        assert vd.poll() is None
    finally:
        setup.close()
        ks.stop()


@root_only
@pytest.mark.slow
def test_stopped_vaultd_stops_new_loads_and_a_replayed_socket_is_refused(vendor, machine, gguf_file, accounts, monkeypatch):
    vault, serve, clients = accounts
    setup = Setup(vendor, gguf_file, accounts, monkeypatch)  # offline license
    try:
        vd = setup.vaultd()
        # serve's uid connects and is served; the same connected socket, used by root, is refused:
        # every request carries its sender's credentials (SCM_CREDENTIALS), not only the connect.
        code = f"""
import os, socket, json
from codemoat.vault.client import VaultClient
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
pid = os.fork()
if pid == 0:
    os.setgroups([{setup.clients.gr_gid}]); os.setgid({serve.pw_gid}); os.setuid({serve.pw_uid})
    c = VaultClient.connect({str(setup.sock)!r})
    os.close(c.fetch({setup.model_id!r}).fd)
    socket.send_fds(a, [b"x"], [c.sock.fileno()])
    os._exit(0)
a.close()
b.settimeout(30)
_, fds, _, _ = socket.recv_fds(b, 1, 1)
os.waitpid(pid, 0)
c = VaultClient(socket.socket(fileno=fds[0]), "replayed")
try:
    c.fetch({setup.model_id!r}); print("served")
except Exception as e:
    print("refused:", e)
"""
        exe, extra = _python_for(pwd.getpwuid(0))
        r = subprocess.run([*exe, "-c", code], env=dict(os.environ, **extra), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("refused:") and "request from uid 0 on a connection of uid" in r.stdout, r.stdout

        proc, url = setup.serve_proc()
        body = {"model": setup.model_id, "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}
        auth = {"Authorization": f"Bearer {setup.token}"}
        before = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60)
        assert before.status_code == 200, before.text
        watermarked_through_vaultd(setup, vendor, gguf_file, proc, url)
        vd.terminate()  # a graceful stop under an offline license: the running serve keeps its model intact
        assert vd.wait(timeout=30) == 0, output(vd)
        after = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60)
        assert after.status_code == 200, after.text
        assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]  # not zeroed under it
        late = setup.spawn(
            serve,
            setup.serve_home,
            "serve",
            "--vault",
            f"unix:{setup.sock}",
            "--model",
            setup.model_id,
            "--port",
            str(free_port()),
        )
        assert late.wait(timeout=120) == 1
        lines = [l for l in output(late).splitlines() if l.strip()]
        assert "Traceback" not in output(late) and "vault daemon" in lines[-1], output(late)
    finally:
        setup.close()


@root_only
@pytest.mark.slow
def test_leased_serve_stops_within_ttl_and_grace_after_vaultd_is_killed(vendor, gguf_file, accounts, monkeypatch):
    ks = KeyServerProcess(vendor).start()
    setup = Setup(vendor, gguf_file, accounts, monkeypatch, mode="lease", keyserver=ks.url, lease_ttl=4, grace=2)
    try:
        vd = setup.vaultd()
        proc, url = setup.serve_proc()
        body = {"model": setup.model_id, "prompt": "def", "max_tokens": 2}
        auth = {"Authorization": f"Bearer {setup.token}"}
        vd.kill()  # nobody renews the lease from here
        vd.wait()
        killed = time.time()
        assert httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60).status_code == 200
        while time.time() < killed + 30:
            r = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60)
            if r.status_code == 503:
                assert "lost the vault daemon" in r.json()["error"]["message"]
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"a leased serve kept serving without vaultd:\n{output(proc)}")
        assert time.time() - killed >= 4  # not before TTL + grace (6 s from the last renewal, >= 4 s from the kill)
    finally:
        setup.close()
        ks.stop()
