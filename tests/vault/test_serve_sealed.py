"""End to end: `codemoat serve --model X.moat --license X.lic` in a subprocess, driven by the openai client;
a revoked lease answers 503 in OpenAI's error shape, and the key server's outage is survived within grace."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from .conftest import KeyServerProcess, free_port
from vaulthelp import bundle, cli

pytestmark = pytest.mark.slow


def start_serve(moat, lic, port, **env_extra):
    env = dict(os.environ, CODEMOAT_MODEL__N_CTX="256", CODEMOAT_MODEL__N_THREADS="1", **env_extra)
    proc = subprocess.Popen(
        [sys.executable, "-m", "codemoat.cli.main", "serve", "--model", str(moat), "--license", str(lic), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("serve did not become healthy")


def test_serve_sealed_lease_then_revoke(vendor, machine, gguf_file, tmp_path):
    from openai import APIStatusError, OpenAI

    ks = KeyServerProcess(vendor).start()
    port = free_port()
    moat, lic, doc = bundle(vendor, gguf_file, tmp_path / "out", machine, mode="lease", keyserver=ks.url, lease_ttl=4, grace=2)
    token = json.loads(cli("tokens", "create", "--name", "vault-e2e", "--json").stdout)["token"]
    proc = start_serve(moat, lic, port)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0)
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt="def add(a, b):\n", max_tokens=8, temperature=0)
        assert out.choices[0].text
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}  # no license facts without a token
        health = httpx.get(f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {token}"}).json()
        assert health["license"]["license_id"] == doc["license"]["id"]
        assert "watermark_key" not in health["license"]  # secrets stay off the wire
        assert health["model_file"] is None
        vendor.revoke(doc["license"]["id"])
        deadline = time.time() + 20  # the next renewal is due within TTL/2 = 2 s
        while time.time() < deadline:
            try:
                client.completions.create(model=model, prompt="x", max_tokens=1)
            except APIStatusError as e:
                assert e.status_code == 503
                assert "revoked" in e.response.json()["error"]["message"]
                break
            time.sleep(0.2)
        else:
            raise AssertionError("serving did not stop after the license was revoked")
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 503
        sent = [json.loads(l) for l in (tmp_path / "home" / "outbound.jsonl").read_text().splitlines()]
        assert sent and all(s["destination"].startswith(ks.url) for s in sent)
        assert not any("def add" in (s["body"] or "") for s in sent)  # no prompt ever leaves
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        ks.stop()
    log = proc.stdout.read()
    assert "decrypted and authenticated" in log and "pages (shmem_enabled=" in log  # the operator sees the load
    key = vendor.content_key(json.loads(cli("inspect", str(moat), "--json").stdout)["file_id"])
    assert key.hex() not in log and base64.b64encode(key).decode() not in log  # and never a key


def test_serve_stops_promptly_when_its_lease_release_meets_a_tarpit(vendor, machine, gguf_file, tmp_path):
    """SIGTERM to a serve holding a lease: its release went through httpx's per-read timeout only, so a proxy
    dripping one byte every 0.05 s held the shutdown for good (a service manager then kills it). It now gives up
    after 6 times vault.keyserver_timeout_s, says so in one line, and exits; the seat frees at the lease's end."""
    from tarpit import Tarpit

    ks = KeyServerProcess(vendor).start()
    tarpit = Tarpit(ks.url).start()
    port = free_port()
    moat, lic, doc = bundle(vendor, gguf_file, tmp_path / "out", machine, mode="lease", keyserver=tarpit.url, lease_ttl=600)
    proc = start_serve(moat, lic, port, CODEMOAT_VAULT__KEYSERVER_TIMEOUT_S="0.5")
    try:
        tarpit.on = True
        proc.terminate()
        try:
            proc.wait(timeout=60)  # the release gives up after 3 s; the rest of the shutdown is slow only at high load
        except subprocess.TimeoutExpired:
            raise AssertionError("serve's shutdown is still waiting on the lease release") from None
        log = proc.stdout.read()
        assert "lease release abandoned" in log, log[-3000:]
        from codemoat.vault.keyserver import KeyServer

        assert KeyServer(vendor).live_leases(doc["license"]["id"]) == 1  # not released: it ends at its TTL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        tarpit.stop()
        ks.stop()
