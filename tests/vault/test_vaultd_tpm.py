"""A TPM-bound license through the vault daemon: vaultd opens it with the chip; `serve --vault` never
needs the TPM (it keeps serving, and a fresh serve starts, with the chip gone), while vaultd cannot
open the license without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from attest.swtpm_fixture import *  # noqa: F403  (the swtpm fixtures; tests/ is on the path)
from attest.tpmhelp import tpm_machine
from codemoat.vault.container import SealedFile
from codemoat.vault.machine import TCTI_ENV

from .conftest import free_port
from vaulthelp import bundle

pytestmark = pytest.mark.slow


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, CODEMOAT_HOME=str(home), CODEMOAT_MODEL__N_CTX="256", CODEMOAT_MODEL__N_THREADS="1", **extra)
    env.pop("CODEMOAT_DEBUG", None)
    return env


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "codemoat.cli.main", *args], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT
    )


def test_tpm_license_opens_in_vaultd_and_serve_never_needs_the_chip(vendor, gguf_file, swtpm, vault_home, tmp_path):
    machine = tpm_machine(swtpm, vendor)
    moat, lic, doc = bundle(vendor, gguf_file, tmp_path / "out", machine)
    assert doc["license"]["machines"][0]["binding"] == "tpm"
    model_id = SealedFile(moat).manifest.model_id
    sock = tmp_path / "vault.sock"
    procs: list[subprocess.Popen] = []
    try:
        vd = _start(
            ["vaultd", "--socket", f"unix:{sock}", "--model", str(moat), "--license", str(lic), "--allow-uid", str(os.getuid())],
            _env(vault_home),
            tmp_path / "vaultd.log",
        )
        procs.append(vd)
        deadline = time.time() + 60
        while not sock.is_socket():
            assert vd.poll() is None and time.time() < deadline, (tmp_path / "vaultd.log").read_text()
            time.sleep(0.1)
        swtpm.stop()  # the chip is gone from here: only vaultd ever used it, to open the license

        serve_home = tmp_path / "serve-home"  # no machine key, no tpm.json: nothing to reach a TPM with
        serve_home.mkdir()
        env = _env(serve_home, **{TCTI_ENV: swtpm.tcti})  # were serve to try the TPM, it would fail
        r = subprocess.run(
            [sys.executable, "-m", "codemoat.cli.main", "tokens", "create", "--name", "dev", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        token = json.loads(r.stdout)["token"]
        port = free_port()
        sv = _start(
            ["serve", "--vault", f"unix:{sock}", "--model", model_id, "--host", "127.0.0.1", "--port", str(port)],
            env,
            tmp_path / "serve.log",
        )
        procs.append(sv)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert sv.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": model_id, "prompt": "def add(a, b):", "max_tokens": 4}
        r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert r.status_code == 200, r.text
        assert not (serve_home / "tpm.json").exists()  # serve's home has its own audit-signing key at most, no TPM
        own = serve_home / "machine.key"
        assert not own.exists() or own.read_bytes() != (vault_home / "machine.key").read_bytes()

        # without the chip, the license does not open: a second vaultd fails, in one line
        late = subprocess.run(
            [sys.executable, "-m", "codemoat.cli.main", "vaultd", "--socket", f"unix:{tmp_path / 'v2.sock'}"]
            + ["--model", str(moat), "--license", str(lic), "--allow-uid", str(os.getuid())],
            env=_env(vault_home),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert late.returncode == 1 and "Traceback" not in late.stderr, late.stderr
        assert len(late.stderr.strip().splitlines()) == 1 and "TPM" in late.stderr, late.stderr
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
