"""`codemoat tune` on a Hugging Face folder, the base the vllm engine serves (issue 16): plaintext, or
sealed with the customer's fingerprint (`vendor seal` of the folder). The adapter records the folder's
digest as its base (`hf_sha256`, what vLLM's check compares with the folder it loads); the sealed
folder is opened under its license and its weights read from memory only (its config and tokenizer
in a private tmpfs folder, removed after); a GGUF-tuned adapter records the .hf folder beside it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError
from tests.conftest import ROOT, files_sized
from tests.tune.test_sealed_base import _license, _tune
from tests.tune.test_tune import PAY, _index

HF = ROOT / "models" / "codemoat-tiny.hf"
GGUF = ROOT / "models" / "codemoat-tiny.gguf"
pytestmark = pytest.mark.skipif(not HF.is_dir(), reason="the bundled model's .hf folder is not there")


@pytest.mark.slow
def test_tune_on_a_hugging_face_folder_plain_and_sealed(tmp_path, home):
    from codemoat.engines.adapters import folder_sha256, load_adapters, open_adapter, open_adapters, parts_identity
    from codemoat.trace.fingerprint import fingerprint_model
    from codemoat.vault.container import SealedFile
    from codemoat.vault.vendor import Vendor

    _index(tmp_path, "payments", PAY, ["payments"])
    digest = folder_sha256(HF)

    plain = open_adapter(_tune(tmp_path, HF, "plain.moat"))
    assert plain.meta["base"]["sha256"] == plain.meta["base"]["hf_sha256"] == digest
    assert plain.meta["base"]["sealed"] is False and json.loads(plain.peft_config)["r"] == 4
    assert [a.name for a in open_adapters([str(plain.path)], "vllm", HF)] == ["plain"]
    with pytest.raises(CodemoatError, match="another base model"):  # llama.cpp serves the GGUF: not this base
        open_adapters([str(plain.path)], "llamacpp", GGUF)

    v = Vendor.init(tmp_path / "vendor")
    try:
        moat = tmp_path / "acme.moat"
        v.seal(HF, "acme", moat, fingerprint=fingerprint_model)
        lic = _license(v, moat, tmp_path / "acme.lic")
    finally:
        v.close()
    manifest = SealedFile(moat).manifest
    weights = next(p["size"] for p in manifest.parts if p["name"].endswith(".safetensors"))
    started = time.time()
    sealed = open_adapter(_tune(tmp_path, moat, "sealed.moat", license=lic))
    # no plaintext weights were written anywhere, tmpfs included, and the private folder is gone
    assert files_sized(weights, started, "/dev/shm", "/tmp", str(tmp_path), str(home)) == []
    assert not [p for p in Path("/dev/shm").glob("codemoat-tune-*")]
    # the sealed folder's identity, from its signed header (the parts' names and sizes, the plaintext's digest)
    identity = parts_identity(manifest.parts, manifest.plaintext_sha256)[0]
    assert sealed.meta["base"]["sha256"] == sealed.meta["base"]["hf_sha256"] == identity
    assert sealed.meta["base"]["sealed"] is True
    assert identity != digest  # the customer's fingerprinted weights, not the vendor's
    # serve of the sealed folder checks the adapter against it
    assert [a.name for a in load_adapters([str(sealed.path)], identity, safetensors=True)] == ["sealed"]
    with pytest.raises(CodemoatError, match="another base model"):
        load_adapters([str(plain.path)], identity, safetensors=True)


def test_a_gguf_base_records_the_folder_vllm_serves_beside_it(tmp_path):
    """load_base of X.gguf: hf_sha256 is X.hf's digest when the folder is there, None when it is not."""
    import shutil

    from codemoat.engines.adapters import folder_sha256
    from codemoat.tune.base import load_base

    base = load_base(GGUF, n_ctx=64)
    assert base.hf_sha256 == folder_sha256(HF) and base.sha256 != base.hf_sha256
    alone = tmp_path / "alone.gguf"
    shutil.copy(GGUF, alone)
    assert load_base(alone, n_ctx=64).hf_sha256 is None
    (tmp_path / "empty.hf").mkdir()
    with pytest.raises(CodemoatError, match="exactly one .safetensors"):
        load_base(tmp_path / "empty.hf")
