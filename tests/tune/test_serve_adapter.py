"""Serving by group: llama.cpp switches the request's adapter per context (and never reuses a KV
cache computed under another), and the server gives base + adapter only to a user who may read every
repository the adapter was trained on; the audit record names the adapter that answered."""

from __future__ import annotations

import asyncio
import os

import pytest

from codemoat.engines.base import SamplingParams
from codemoat.errors import CodemoatError
from tests.tune.loras import random_lora_gguf, sealed_adapter

PROMPT = "def interchange_fee(amount_cents: int) -> int:\n    return"


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    from codemoat.engines.llamacpp import LlamaCppEngine

    fd = os.memfd_create("lora")
    os.write(fd, random_lora_gguf(tiny_gguf))
    eng = LlamaCppEngine(str(tiny_gguf), n_ctx=256, n_threads=2, adapters={"pay": f"/proc/self/fd/{fd}"})
    yield eng
    eng.close()
    os.close(fd)


def _complete(eng, adapter, prompt=PROMPT):
    p = SamplingParams(max_tokens=12, temperature=0, adapter=adapter)
    return asyncio.run(eng.complete(prompt, p)).text


LONG = "".join(f"def fee_{i}(amount_cents: int) -> int:\n    return amount_cents * {i} // 1000\n\n" for i in range(3)) + PROMPT


def test_adapter_per_request_and_no_cache_shared_between_them(engine):
    """A long prompt (several cached chunks) asked with, then without, the adapter, and back: each
    answer equals the one computed from an empty cache."""
    _complete(engine, None, "x = 1\n")
    base = _complete(engine, None, LONG)
    _complete(engine, "pay", "x = 1\n")
    tuned = _complete(engine, "pay", LONG)
    assert tuned != base
    assert _complete(engine, None, LONG) == base
    assert _complete(engine, "pay", LONG) == tuned


def test_unknown_adapter_is_refused(engine):
    with pytest.raises(CodemoatError, match="no adapter named 'other'"):
        _complete(engine, "other")


@pytest.mark.slow
def test_server_serves_the_adapter_by_group_and_audits_it(tmp_path, tiny_gguf):
    from pathlib import Path

    from fastapi.testclient import TestClient

    from codemoat.accounts import Accounts
    from codemoat.audit.log import AuditLog
    from codemoat.config import load_settings
    from codemoat.db import open_db
    from codemoat.engines.factory import build_engine
    from codemoat.engines.holder import ModelHolder
    from codemoat.retrieve import Retriever
    from codemoat.serve.app import create_app
    from tests.conftest import run_cli

    for name, groups in (("payments", "payments"), ("ledger", "payments,finance")):
        root = tmp_path / name
        root.mkdir()
        (root / "a.py").write_text(f"NAME = {name!r}\n")
        assert run_cli("index", "add", str(root), "--name", name, "--groups", groups).returncode == 0
    adapter = sealed_adapter(
        Path(tiny_gguf), tmp_path / "pay.moat", "pay", [("payments", ["payments"]), ("ledger", ["payments", "finance"])]
    )
    settings = load_settings(**{"model.adapters": [str(adapter)], "model.n_ctx": 256, "model.n_threads": 2})
    accounts = Accounts(open_db())
    accounts.add_user("alice", ["payments"])
    accounts.add_user("carol", ["contractors"])
    accounts.add_user("fred", ["finance"])  # reads ledger, not payments
    tokens = {u: accounts.create_token(f"{u}-editor", user=u)[1] for u in ("alice", "carol", "fred")}
    holder = ModelHolder("tiny")
    holder.set(build_engine(settings, Path(tiny_gguf), "tiny"))  # supervised child: the adapter's memfd goes along
    app = create_app(settings, holder=holder, accounts=accounts, retriever=Retriever())
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    texts = {}
    with TestClient(app) as c:
        for u, tok in tokens.items():
            r = c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {tok}"})
            assert r.status_code == 200, r.text
            texts[u] = r.json()["choices"][0]["text"]
    holder.close() if hasattr(holder, "close") else None
    assert texts["alice"] != texts["carol"] and texts["carol"] == texts["fred"]
    recs = {r["user"]: r for r in AuditLog(open_db()).records(kind="request") if r["user"] in tokens}
    assert recs["alice"]["detail"].get("adapter") == "pay"
    assert "adapter" not in recs["carol"]["detail"] and "adapter" not in recs["fred"]["detail"]


def test_adapter_for_another_base_is_refused(tmp_path, tiny_gguf, random_gguf):
    from pathlib import Path

    from codemoat.config import load_settings
    from codemoat.engines.factory import build_engine

    if Path(tiny_gguf) == Path(random_gguf):
        pytest.skip("needs two different models")
    adapter = sealed_adapter(Path(random_gguf), tmp_path / "other.moat", "other", [("payments", ["payments"])])
    settings = load_settings(**{"model.adapters": [str(adapter)]})
    with pytest.raises(CodemoatError, match="tuned on another base model"):
        build_engine(settings, Path(tiny_gguf), "tiny")
