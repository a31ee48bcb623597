"""End to end through the real `codemoat serve`: a real server on 127.0.0.1, the official openai client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "codemoat.cli.main"]


@pytest.mark.slow
def test_serve_audits_every_request_and_verifies(audit_home, port, tmp_path):
    openai = pytest.importorskip("openai")
    sys.path.insert(0, str(ROOT / "tests"))
    from tinymodel import build_tiny_gguf

    model = build_tiny_gguf(tmp_path / "tiny.gguf")
    env = dict(
        os.environ, CODEMOAT_HOME=str(audit_home), CODEMOAT_AUDIT__RETAIN_TEXT="true", CODEMOAT_POLICY__REQUESTS_PER_MINUTE="50"
    )
    tok = json.loads(
        subprocess.run(
            [*CLI, "tokens", "create", "--name", "dev", "--json"], env=env, capture_output=True, text=True, check=True
        ).stdout
    )["token"]
    server = subprocess.Popen(
        [*CLI, "serve", "--model", str(model), "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120  # a loaded 2-core CI can take tens of seconds to start serve
        while True:
            assert server.poll() is None and time.time() < deadline, "serve did not start"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=base + "/v1", api_key=tok, max_retries=0)
        model_id = client.models.list().data[0].id
        secret = "ghp_" + "Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0Pp9Oo8Nn"
        client.completions.create(model=model_id, prompt=f"token = '{secret}'\ndef add(a, b):", max_tokens=8)
        chunks = list(
            client.chat.completions.create(
                model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
            )
        )
        assert chunks
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(base + "/metrics").status_code == 401  # traffic figures need a token
        scraper = json.loads(
            subprocess.run(
                [*CLI, "tokens", "create", "--name", "prometheus", "--scopes", "metrics", "--json"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )["token"]
        metrics = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {scraper}"}).text
        assert 'codemoat_requests_total{protocol="openai",route="/v1/completions",status="2xx"} 1.0' in metrics
        assert "codemoat_model_loaded 1.0" in metrics and "codemoat_queue_depth 0.0" in metrics  # the service's line
    finally:
        server.send_signal(signal.SIGTERM)
        out = server.communicate(timeout=60)[0].decode()
    # uvicorn re-raises SIGTERM after a graceful shutdown
    assert server.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in out, out[-2000:]
    r = subprocess.run([*CLI, "audit", "verify", "--json"], env=env, capture_output=True, text=True)
    rep = json.loads(r.stdout)
    assert r.returncode == 0 and rep["ok"] and rep["records"] == 5 and rep["checkpoints"] == 1, rep  # shutdown checkpoint
    recs = [
        json.loads(x)
        for x in subprocess.run(
            [*CLI, "audit", "export"], env=env, capture_output=True, text=True, check=True
        ).stdout.splitlines()
    ]
    assert [(x["kind"], x["route"], x["status"]) for x in recs] == [
        ("request", "/v1/models", 200),
        ("request", "/v1/completions", 200),
        ("request", "/v1/chat/completions", 200),
        ("request", "/v1/models", 401),
        ("unauthenticated", None, None),
    ]  # the /metrics refusal after it, counted
    assert recs[4]["detail"]["count"] == 1 and recs[4]["detail"]["routes"] == {"/metrics": 1}
    assert recs[1]["completion_tokens"] > 0 and recs[2]["user"] == "dev"
    blob = b"".join(p.read_bytes() for p in audit_home.glob("codemoat.db*"))
    assert b"def add(a, b):" in blob and secret.encode() not in blob
