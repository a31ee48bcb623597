"""A sealed model is built like a plaintext one (`engine_class(model.engine)`, `from_buffer`) and served
under its manifest's model id, with the .moat file's stem accepted as another name."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from codemoat.accounts import Accounts
from codemoat.config import load_settings
from codemoat.db import open_db
from codemoat.engines.loader import open_model
from codemoat.engines.sealed import open_sealed
from codemoat.errors import CodemoatError
from codemoat.serve.app import create_app
from codemoat.vault.container import SealedFile
from vaulthelp import bundle

SMALL = {"model.n_ctx": 256, "model.n_threads": 1}


def test_served_under_the_manifest_id_with_the_file_stem_as_alias(vendor, machine, gguf_file, tmp_path):
    moat, lic, _ = bundle(vendor, gguf_file, tmp_path / "out", machine)
    model_id = SealedFile(moat).manifest.model_id
    assert moat.stem == "acme" and model_id != "acme"
    settings = load_settings(**{"model.path": str(moat), "model.license": str(lic), **SMALL})
    holder = open_model(settings)
    accounts = Accounts(open_db())
    _, token = accounts.create_token("alice")
    with TestClient(create_app(settings, holder=holder, accounts=accounts)) as c:
        c.headers["Authorization"] = f"Bearer {token}"
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [model_id]
        for name in (model_id, "acme"):
            r = c.post("/v1/completions", json={"model": name, "prompt": "def add(a, b):", "max_tokens": 2})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == model_id
        r = c.post(
            "/api/generate", json={"model": "acme:latest", "prompt": "def", "stream": False, "options": {"num_predict": 2}}
        )
        assert r.status_code == 200, r.text
        r = c.post("/v1/completions", json={"model": "other", "prompt": "def", "max_tokens": 2})
        assert r.status_code == 404 and model_id in r.json()["error"]["message"]


def test_model_id_setting_wins_and_the_stem_stays_an_alias(vendor, machine, gguf_file, tmp_path):
    moat, lic, _ = bundle(vendor, gguf_file, tmp_path / "out", machine)
    holder = open_model(load_settings(**{"model.path": str(moat), "model.license": str(lic), "model.id": "coder", **SMALL}))
    try:
        assert holder.model_id == "coder" and holder.status.aliases == ["acme"]
    finally:
        holder.close()


def test_sealed_model_goes_through_the_configured_engine(vendor, machine, gguf_file, tmp_path):
    """`model.engine` is honoured for a .moat: an engine that cannot take a decrypted buffer says so in
    one line (it used to be ignored, the model silently served by llama.cpp)."""
    moat, lic, _ = bundle(vendor, gguf_file, tmp_path / "out", machine)
    with pytest.raises(CodemoatError, match="the vllm engine serves sealed Hugging Face folders"):
        open_sealed(moat, lic, settings=load_settings(**{"model.engine": "vllm", **SMALL}))
    # an engine named as module:Class, in the server's own process: built by its from_buffer
    settings = load_settings(**{"model.engine": "codemoat.engines.llamacpp:LlamaCppEngine", "model.isolation": "inline", **SMALL})
    holder = open_sealed(moat, lic, settings=settings)
    try:
        eng = holder.get()
        assert type(eng).__name__ == "LlamaCppEngine" and eng._memfd is not None and eng._memfd.sealed
    finally:
        holder.close()
    with pytest.raises(CodemoatError, match="not an Engine class"):
        open_sealed(moat, lic, settings=load_settings(**{"model.engine": "codemoat.errors:CodemoatError", **SMALL}))
