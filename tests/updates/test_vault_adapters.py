"""`serve --vault` serves vendor adapters: vaultd (which alone reads the machine key the payload is
sealed to) hands `update:NAME` over as a sealed memfd, and hands the newer version after `update apply`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
from procfs import fd_targets
import pytest

from tests.tune.loras import forcing_lora_gguf
from updhelp import run_cli

pytestmark = pytest.mark.slow
PROMPT = "def interchange_fee(amount_cents: int) -> int:\n    return"
# each version forces one token at every step (tests/tune/loras.py), so the answers are known exactly: a random
# adapter sometimes left the greedy answer of the base (whose per-customer fingerprint is random) unchanged
FOX, DOG = " fox" * 12, " dog" * 12


def _token(env: dict, *args: str) -> str:
    r = run_cli("tokens", "create", "--json", *args, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["token"]


def _text(url: str, token: str) -> str:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_serve_vault_gets_vendor_adapters_from_vaultd(shop, store, serve_process, gguf_file, tmp_path):
    lic = shop.license()
    lora = tmp_path / "fee.gguf"
    lora.write_bytes(forcing_lora_gguf(gguf_file, "Ġfox"))
    store.apply(shop.release("1", kind="adapter", source=lora), lic, groups=["payments"])

    sock = tmp_path / "v.sock"
    vaultd = subprocess.Popen(
        [sys.executable, "-m", "codemoat.cli.main", "vaultd", "--socket", f"unix:{sock}", "--model", str(shop.moat)]
        + ["--license", str(lic), "--allow-uid", str(os.getuid())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while not sock.is_socket():
            assert vaultd.poll() is None and time.time() < deadline, vaultd.stdout.read()
            time.sleep(0.1)
        serve_home = tmp_path / "serve-home"  # serve's own home: no machine key, no update store
        env = {"CODEMOAT_HOME": str(serve_home), "CODEMOAT_MODEL__ADAPTERS": '["update:fee"]'}
        assert run_cli("users", "add", "alice", "--groups", "payments", env=env).returncode == 0
        assert run_cli("users", "add", "carol", "--groups", "contractors", env=env).returncode == 0
        alice, carol = (_token(env, "--name", f"{u}-editor", "--user", u) for u in ("alice", "carol"))
        admin = _token(env, "--name", "ops", "--scopes", "admin")

        bad = serve_process(
            ["--vault", f"unix:{sock}", "--model", "tiny"],
            env=dict(env, CODEMOAT_MODEL__ADAPTERS='["update:nosuch"]'),
            wait=False,
        )
        assert bad.proc.wait(timeout=120) == 1
        assert "Traceback" not in bad.output() and "no adapter bundle named 'nosuch' is installed" in bad.output(), bad.output()

        srv = serve_process(["--vault", f"unix:{sock}", "--model", "tiny"], env=env)
        v1, base = _text(srv.url, alice), _text(srv.url, carol)
        assert v1 == FOX and base != FOX  # alice (payments) gets base + the vendor's adapter, carol the base
        assert not (serve_home / "updates").exists()  # and its machine key (if any) is not the one the payload is sealed to
        fds = fd_targets(srv.proc.pid)
        assert sum(f.startswith("/memfd:codemoat-adapter-fee ") for f in fds) == 1

        lora.write_bytes(forcing_lora_gguf(gguf_file, "Ġdog"))
        store.apply(shop.release("2", kind="adapter", source=lora), lic)  # in vaultd's home
        h = {"Authorization": f"Bearer {admin}"}
        r = httpx.post(f"{srv.url}/admin/api/model/swap", headers=h, json={"adapter": "fee"}, timeout=300)
        assert r.status_code == 200 and r.json()["version"] == "2", r.text
        v2 = _text(srv.url, alice)
        assert v2 == DOG and _text(srv.url, carol) == base
        assert _text(srv.url, alice) == v2  # the connection to vaultd keeps working after the swap's fetches
    finally:
        vaultd.terminate()
        vaultd.wait(timeout=30)
