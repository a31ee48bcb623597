"""An adapter bundle names the base model it was made for (signed); it installs only over that model."""

from __future__ import annotations

import json
import os

import pytest

from codemoat.errors import CodemoatError
from updhelp import lora_gguf, one_line_error, run_cli


def _adapter(tmp_path):
    p = tmp_path / "fee.gguf"
    lora_gguf(p, 32)
    return p


def test_adapter_bundle_names_the_licensed_model_as_its_base(shop, store, tmp_path):
    from codemoat.updates.bundle import Bundle
    from codemoat.vault.container import SealedFile

    lic = shop.license()
    b = shop.release("1", kind="adapter", source=_adapter(tmp_path))
    base = Bundle(b).manifest["base"]
    assert base["sha256"] == SealedFile(shop.moat).manifest.plaintext_sha256  # the customer's copy, by default
    assert store.verify(b, lic)["bundle"]["base"] == base
    out = store.apply(b, lic)
    assert [r["base"] for r in store.list() if r["channel"] == "adapter:fee"] == [base]
    assert out["version"] == "1"


def test_adapter_for_another_base_is_refused_at_verify_and_apply(shop, store, tmp_path):
    lic = shop.license()
    other = tmp_path / "other-model.gguf"
    other.write_bytes(os.urandom(4096))
    b = shop.release("1", kind="adapter", source=_adapter(tmp_path), base_model=other)
    for step in (lambda: store.verify(b, lic), lambda: store.apply(b, lic)):
        with pytest.raises(
            CodemoatError, match=r"adapter fee 1 is for base model other-model [0-9a-f]{12}, not the installed model"
        ):
            step()
    assert store.list() == []
    refused = [d for s, d in store.records if s == "refused"]
    assert len(refused) == 2 and "is for base model other-model" in refused[-1]["reason"]

    # nothing to compare with: refused too (not installed blind)
    store.models = []
    with pytest.raises(CodemoatError, match="no model is installed here to check it against"):
        store.apply(shop.release("1", kind="adapter", source=_adapter(tmp_path)), lic)

    # the CLI: one line, also when the model is the one given as model.path
    good = shop.release("1", kind="adapter", source=_adapter(tmp_path))
    env = {"CODEMOAT_MODEL__PATH": str(other)}
    line = one_line_error(run_cli("update", "verify", str(good), "--license", str(lic), env=env))
    assert "is for base model" in line and "other-model.gguf" in line
    r = run_cli("update", "apply", str(good), "--license", str(lic), "--json", env={"CODEMOAT_MODEL__PATH": str(shop.moat)})
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == "1", r.stderr


def test_adapter_bundle_without_a_base_is_refused_clearly(shop, store, tmp_path):
    """A bundle made before manifests named a base (still validly signed) is refused in one clear line;
    a base changed after signing breaks the signature."""
    from codemoat.updates import bundle as fmt

    lic = shop.license()
    b = shop.release("1", kind="adapter", source=_adapter(tmp_path))
    old = fmt.Bundle(b)
    payload = b.read_bytes()[old.payload_offset :]
    legacy = tmp_path / "legacy.moatpkg"
    fmt.write(legacy, {k: v for k, v in old.manifest.items() if k != "base"}, shop.vendor.signing_key, iter([payload]))
    assert "base" not in fmt.Bundle(legacy).manifest  # readable
    with pytest.raises(CodemoatError, match="names no base model .* ask the vendor to release it again"):
        store.verify(legacy, lic)
    with pytest.raises(CodemoatError, match="names no base model"):
        store.apply(legacy, lic)

    data = bytearray(b.read_bytes())
    at = data.index(old.manifest["base"]["sha256"].encode())
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    forged = tmp_path / "forged.moatpkg"
    forged.write_bytes(bytes(data))
    with pytest.raises(CodemoatError, match="signature"):
        store.verify(forged, lic)
    for bad in ({"model_id": "x", "sha256": "zz"}, "abc", {"sha256": "0" * 64}):
        signed = tmp_path / "bad-base.moatpkg"
        fmt.write(signed, dict(old.manifest, base=bad), shop.vendor.signing_key, iter([payload]))
        with pytest.raises(CodemoatError, match="'base' is malformed"):
            store.verify(signed, lic)
