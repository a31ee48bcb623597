"""The vendor store: customers and their secrets, persisted encrypted; keys refused when missing."""

from __future__ import annotations

import os
import sqlite3

import pytest

from codemoat.errors import CodemoatError
from codemoat.vault.codec import VaultError
from codemoat.vault.vendor import Vendor
from ggufs import write_gguf


def test_customers_persist_with_secrets_encrypted_at_rest(vendor, tmp_path):
    a = vendor.customer("ACME")
    assert vendor.customer("ACME") == a  # created once
    b = vendor.customer("Bolt")
    assert len(a.fingerprint_secret) == len(a.watermark_secret) == 32
    assert len({a.fingerprint_secret, a.watermark_secret, b.fingerprint_secret, b.watermark_secret}) == 4
    vendor.close()
    again = Vendor.open(tmp_path / "vendor")
    assert [c.name for c in again.customers()] == ["ACME", "Bolt"]
    assert again.customer("ACME").watermark_secret == a.watermark_secret
    raw = (tmp_path / "vendor" / "vendor.db").read_bytes()
    for path in (tmp_path / "vendor").glob("vendor.db*"):
        raw += path.read_bytes()
    assert a.fingerprint_secret not in raw and a.watermark_secret not in raw
    again.close()


def test_database_without_master_key_opens_nothing(vendor, tmp_path):
    model = write_gguf(tmp_path / "m.gguf", 1000)
    sealed = vendor.seal(model, "ACME", tmp_path / "a.moat")
    vendor.close()
    (tmp_path / "vendor" / "master.key").write_bytes(os.urandom(32))
    v = Vendor.open(tmp_path / "vendor")
    with pytest.raises(VaultError, match="cannot be decrypted with this vendor's master key"):
        v.content_key(sealed.manifest.file_id)
    v.close()
    (tmp_path / "vendor" / "master.key").unlink()
    with pytest.raises(VaultError, match="master.key is missing"):
        Vendor.open(tmp_path / "vendor")


def test_init_refuses_to_overwrite_and_files_are_private(vendor, tmp_path):
    with pytest.raises(CodemoatError, match="refusing to overwrite"):
        Vendor.init(tmp_path / "vendor")
    for name in ("signing.key", "keyserver.key", "master.key"):
        assert (tmp_path / "vendor" / name).stat().st_mode & 0o777 == 0o600


def test_seal_rejects_non_models(vendor, tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + os.urandom(10))
    with pytest.raises(CodemoatError, match="not a valid GGUF file"):
        vendor.seal(bad, "ACME", tmp_path / "x.moat")
    with pytest.raises(CodemoatError, match="model not found"):
        vendor.seal(tmp_path / "missing.gguf", "ACME", tmp_path / "x.moat")
    folder = tmp_path / "st"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(CodemoatError, match="no config.json"):
        vendor.seal(folder, "ACME", tmp_path / "x.moat")
    assert not (tmp_path / "x.moat").exists()


def test_fingerprint_hook_gets_the_customers_secret(vendor, tmp_path):
    model = write_gguf(tmp_path / "m.gguf", 5000)
    data = model.read_bytes()
    seen = {}

    def mark(data: bytes, fmt: str, secret: bytes) -> bytes:
        seen.update(fmt=fmt, secret=secret)
        return data[:4] + bytes(b ^ 0x55 for b in data[4:])

    sealed = vendor.seal(model, "ACME", tmp_path / "a.moat", fingerprint=mark)
    assert seen == {"fmt": "gguf", "secret": vendor.customer("ACME").fingerprint_secret}
    assert sealed.manifest.fingerprinted
    plain = bytes(sealed.decrypt(vendor.content_key(sealed.manifest.file_id)))
    assert plain == data[:4] + bytes(b ^ 0x55 for b in data[4:])
    with sqlite3.connect(tmp_path / "vendor" / "vendor.db") as c:
        assert c.execute("select fingerprinted from vault_models").fetchone() == (1,)


def test_seal_refuses_a_hostile_safetensors_header_naming_the_file(vendor, tmp_path):
    """A customer's safetensors folder whose header would cost gigabytes to decode (a million `{}`
    values) is refused before it is decoded, with or without the fingerprint, in one line naming the
    weights; before, `--no-fingerprint` sealed it as it was, for the server to decode. A real file seals."""
    import json
    import struct

    import torch
    from safetensors.torch import save

    from codemoat.trace.fingerprint import fingerprint_model

    folder = tmp_path / "st"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    weights = folder / "model.safetensors"
    header = b'{"a":[' + b"{}," * 1_000_000 + b"{}]}"
    weights.write_bytes(struct.pack("<Q", len(header)) + header)
    for fp in (None, fingerprint_model):
        with pytest.raises(CodemoatError) as e:
            vendor.seal(folder, "ACME", tmp_path / "x.moat", fingerprint=fp)
        assert str(e.value).startswith(f"{weights}: not a safetensors file: header holds more than 2000000 JSON values")
        assert "\n" not in str(e.value) and not (tmp_path / "x.moat").exists()
    weights.write_bytes(save({"w": torch.ones((8, 8)), "n": torch.ones(8)}))
    for fp in (None, fingerprint_model):
        sealed = vendor.seal(folder, "ACME", tmp_path / "x.moat", fingerprint=fp)
        assert sealed.manifest.format == "safetensors" and sealed.manifest.fingerprinted == (fp is not None)
        (tmp_path / "x.moat").unlink()
