"""Helpers for the update tests: the vendor's side (Shop) and the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from cli_errors import one_line_error  # noqa: F401 (the update tests import it from here)

DAY = 86400


class Shop:
    """The vendor's side of a test: a customer sealed and licensed, bundles released on demand."""

    def __init__(self, vendor, machine, gguf: Path, folder: Path):
        self.vendor, self.machine, self.gguf, self.folder = vendor, machine, gguf, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.moat = folder / "acme-v1.moat"
        vendor.seal(gguf, "acme", self.moat)
        self.last, self.last_customer = None, None

    def license(
        self,
        *,
        support_until: float | None = None,
        days: float = 30,
        machine=None,
        customer: str = "acme",
        name: str | None = None,
        **kw,
    ) -> Path:
        moat = self.moat
        self.last_customer = customer
        if customer != "acme":
            moat = self.folder / f"{customer}.moat"
            if not moat.exists():
                self.vendor.seal(self.gguf, customer, moat)
        doc = self.vendor.issue_license(
            customer=customer,
            model=moat,
            machines=[(machine or self.machine).identity()],
            expires=int(time.time() + days * DAY),
            support_until=None if support_until is None else int(support_until),
            **kw,
        )
        self.last = doc["license"]["id"]  # releases take this license's machines and terms
        p = self.folder / (name or f"{doc['license']['id']}.lic")
        p.write_text(json.dumps(doc))
        return p

    def release(self, version: str, kind: str = "model", source: Path | None = None, customer: str = "acme", **kw) -> Path:
        from codemoat.updates.release import release

        out = self.folder / f"{customer}-{kind}-{version}-{time.monotonic_ns()}.moatpkg"
        kw.setdefault("license_id", self.last if customer == self.last_customer else None)
        release(self.vendor, customer=customer, kind=kind, source=source or self.gguf, version=version, out=out, **kw)
        return out


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = dict(os.environ, **(env or {}))
    e.pop("CODEMOAT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "codemoat.cli.main", *args], capture_output=True, text=True, env=e, timeout=timeout
    )


def create_token(*extra: str) -> str:
    r = run_cli("tokens", "create", "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["token"]


def stream_forever(url: str, token: str, body: dict, stop: threading.Event, stats: dict, lock: threading.Lock) -> None:
    """One client streaming completions until `stop`; counts done/failed, start times and latencies."""
    body = dict(body, stream=True)
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            t = time.monotonic()
            try:
                with c.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}) as r:
                    text = "".join(r.iter_text())
                ok = r.status_code == 200 and "data: [DONE]" in text and '"error"' not in text
            except httpx.HTTPError as e:
                ok, text = False, repr(e)
            with lock:
                stats["done" if ok else "failed"] += 1
                stats["lat"].append((t, time.monotonic() - t))
                if not ok:
                    stats["errors"].append(text[-300:])


class Streams:
    """Clients streaming completions (`stream_forever`) while a test changes the server under them."""

    def __init__(self, url: str, token: str, body: dict, clients: int):
        self.stop, self.lock = threading.Event(), threading.Lock()
        self.stats: dict = {"done": 0, "failed": 0, "lat": [], "errors": []}
        args = (url, token, body, self.stop, self.stats, self.lock)
        self.threads = [threading.Thread(target=stream_forever, args=args) for _ in range(clients)]

    def __enter__(self) -> Streams:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def served_after(self, t: float, timeout: float = 120) -> bool:
        """Wait until some streamed request that started after `t` has finished (a busy machine is slow)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if any(t0 > t for t0, _ in self.stats["lat"]):
                    return True
            time.sleep(0.2)
        return False


def mute_gguf(src, dst):
    """A copy of `src` whose output layer is zero: every logit ties, greedy picks token 0, the end-of-text
    token, so the model loads but produces no token for any prompt (it fails the health check)."""
    import gguf

    shutil.copyfile(src, dst)
    r = gguf.GGUFReader(str(dst), "r+")
    next(t for t in r.tensors if t.name == "output.weight").data[...] = 0
    del r
    return dst


ADAPTER_PROMPT = "def interchange_fee(amount_cents: int) -> int:\n    return"
# the test adapters force one token at every step (tests/tune/loras.py), so the answer with each is known exactly
FOX, DOG = " fox" * 12, " dog" * 12


def adapter_text(url: str, token: str, model: str = "tiny") -> str:
    """The greedy 12-token completion of ADAPTER_PROMPT for `token` (FOX or DOG when served with a test adapter)."""
    body = {"model": model, "prompt": ADAPTER_PROMPT, "max_tokens": 12, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


class Vaultd:
    """`codemoat vaultd` on `sock` holding `moat` under `lic`, for this uid, in this test's home (a context)."""

    def __init__(self, sock: Path, moat: Path, lic: Path):
        cmd = [sys.executable, "-m", "codemoat.cli.main", "vaultd", "--socket", f"unix:{sock}", "--model", str(moat)]
        cmd += ["--license", str(lic), "--allow-uid", str(os.getuid())]
        self.sock = sock
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def __enter__(self) -> Vaultd:
        deadline = time.time() + 60
        while not self.sock.is_socket():
            assert self.proc.poll() is None and time.time() < deadline, self.proc.stdout.read()
            time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def lora_gguf(path: Path, side: int = 16) -> Path:
    """A small LoRA adapter GGUF as llama.cpp's converter writes one (general.type = adapter, adapter.type = lora),
    one f32 tensor of side x side: what `vendor release --adapter` accepts (`seal_model.check_lora_adapter`)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 16.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.arange(side * side, dtype=np.float32).reshape(side, side))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def wait_unavailable(srv, timeout: float = 180) -> None:
    """Until serve `srv` (started with wait=False) answers /health with 503: it runs, and says it serves nothing."""
    deadline = time.monotonic() + timeout
    while True:
        assert srv.proc.poll() is None and time.monotonic() < deadline, srv.output()
        try:
            if httpx.get(f"{srv.url}/health", timeout=5).status_code == 503:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
