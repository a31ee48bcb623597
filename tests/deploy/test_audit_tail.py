"""Batched audit signatures across real replicas on PostgreSQL: a replica SIGKILLed before it signed
its last records leaves them as an unsigned tail that `audit verify` reports (count and age) but
does not fail, and the next replica that appends signs them; nothing is lost or doubled."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from conftest import create_token, verified_audit

pytestmark = pytest.mark.slow


def test_a_killed_replicas_unsigned_records_are_reported_then_signed_by_another(
    pg_cluster, tiny_gguf, serve_process, monkeypatch
):
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", pg_cluster.new_database())
    token = create_token("--name", "alice")  # one CLI append, signed at the command's exit
    base = verified_audit()
    assert base["ok"] and base["unsigned"] == 0
    slow = serve_process(["--model", str(tiny_gguf)], env={"CODEMOAT_AUDIT__SIGN_INTERVAL_MS": "600000"})
    quick = serve_process(["--model", str(tiny_gguf)], env={"CODEMOAT_AUDIT__SIGN_INTERVAL_MS": "300"})
    hdr = {"Authorization": f"Bearer {token}"}
    for _ in range(5):
        assert httpx.get(slow.url + "/v1/models", headers=hdr, timeout=30).status_code == 200
    os.kill(slow.proc.pid, signal.SIGKILL)  # before its 64th record or its timer: nothing signed since start
    slow.proc.wait(timeout=30)

    rep = verified_audit()
    assert rep["ok"] and rep["unsigned"] >= 5 and rep["unsigned_since"], rep
    assert "follow the signed head" in rep["warning"] and "cut or rewrite" in rep["warning"]
    n = rep["records"]

    assert httpx.get(quick.url + "/v1/models", headers=hdr, timeout=30).status_code == 200
    deadline = time.time() + 30
    while (rep := verified_audit())["unsigned"] and time.time() < deadline:  # the other replica's timer signs the tail
        time.sleep(0.3)
    assert rep["ok"] and rep["unsigned"] == 0 and rep["records"] == n + 1, rep
    quick.stop()
    rep = verified_audit()
    assert rep["ok"] and rep["unsigned"] == 0 and rep["records"] == n + 1
