"""Sealing refuses a model that is not whole, through the API as through the CLI.

Was: `Vendor.seal` (what `vendor release` and every caller of the API reach) read only a GGUF's magic, so a
truncated model, the magic followed by garbage, or a header naming tensors past the file's end was sealed and
shipped, and the customer learned it at load time from a file nobody could inspect. Now each is refused in one
line naming the file, before anything is written: no sealed file, no temporary file, no customer row."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import run_cli
from ggufs import truncated, write_gguf
from vaulthelp import one_line_error

from codemoat.errors import CodemoatError
from codemoat.trace.fingerprint import fingerprint_model
from codemoat.vault.vendor import models_t


def _plain_mark(data: bytes, fmt: str, secret: bytes) -> bytes:
    """A fingerprint without a `stream`: `seal_model` reads the model whole (`read_model`) for it."""
    return data


def _no_tensors(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


BAD_GGUF = {
    "empty": (lambda d: _write(d / "empty.gguf", b""), "truncated or not a valid GGUF file"),
    "random bytes": (lambda d: _write(d / "noise.gguf", os.urandom(20_000)), "truncated or not a valid GGUF file"),
    "magic then garbage": (lambda d: _write(d / "garbage.gguf", b"GGUF" + os.urandom(20_000)), "not a valid GGUF file"),
    "header cut": (lambda d: truncated(write_gguf(d / "w.gguf"), d / "cut.gguf", 0.001), "not a valid GGUF file"),
    "tensor data past the end": (lambda d: truncated(write_gguf(d / "w.gguf"), d / "short.gguf", 0.5), "not a valid GGUF file"),
    "no tensors": (lambda d: _no_tensors(d / "none.gguf"), "a GGUF model holds tensors, this one none"),
}
FINGERPRINTS = {"none": None, "streamed": fingerprint_model, "read whole": _plain_mark}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _models(vendor) -> int:
    with vendor.engine.connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(models_t)).scalar_one()


@pytest.mark.parametrize("fp", FINGERPRINTS.values(), ids=FINGERPRINTS.keys())
@pytest.mark.parametrize("case", BAD_GGUF.values(), ids=BAD_GGUF.keys())
def test_a_gguf_that_is_not_whole_is_refused_and_nothing_is_written(vendor, tmp_path, case, fp):
    make, message = case
    src = tmp_path / "src"
    src.mkdir()
    bad = make(src)
    before = bad.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CodemoatError, match=message) as e:
        vendor.seal(bad, "acme", out / "a.moat", fingerprint=fp)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert list(out.iterdir()) == []  # no sealed file, no .part left behind
    assert vendor.find_customer("acme") is None and _models(vendor) == 0
    assert bad.read_bytes() == before


@pytest.mark.parametrize("fp", FINGERPRINTS.values(), ids=FINGERPRINTS.keys())
def test_a_whole_gguf_seals_and_opens_to_its_bytes(vendor, tmp_path, fp):
    """The positive beside the refusals: a small valid GGUF seals with every fingerprint path; unmarked, the
    vendor's key opens it to the very bytes sealed. (Sealed, licensed and loaded into llama.cpp: test_sealed_engine.)"""
    model = write_gguf(tmp_path / "m.gguf", 20_000)
    sealed = vendor.seal(model, "acme", tmp_path / "a.moat", fingerprint=fp)
    plain = bytes(sealed.decrypt(vendor.content_key(sealed.manifest.file_id), check_sha256=True))
    assert len(plain) == model.stat().st_size and plain[:4] == b"GGUF"
    if fp is not fingerprint_model:
        assert plain == model.read_bytes()
    else:
        assert plain != model.read_bytes()  # marked: same size, other weights
    assert _models(vendor) == 1


def test_vendor_seal_cli_refuses_an_empty_or_short_gguf(tmp_path, vendor):
    """Through the CLI, with and without the fingerprint: one line, exit 1, no output file; a whole one seals."""
    empty = _write(tmp_path / "empty.gguf", b"")
    short = truncated(write_gguf(tmp_path / "w.gguf"), tmp_path / "short.gguf", 0.5)
    out = tmp_path / "a.moat"
    for bad, extra in ((empty, ()), (short, ("--no-fingerprint",))):
        r = run_cli("vendor", "seal", str(bad), "--vendor", str(vendor.root), "--customer", "acme", "--out", str(out), *extra)
        one_line_error(r, "not a valid GGUF file")
        assert not out.exists()
    r = run_cli("vendor", "seal", str(tmp_path / "w.gguf"), "--vendor", str(vendor.root), "--customer", "acme", "--out", str(out))
    assert r.returncode == 0 and out.read_bytes()[:8] == b"CODEMOAT", r.stderr


def _st_folder(folder: Path, header: dict, data: bytes) -> Path:
    folder.mkdir()
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


BAD_ST = {
    "tensor past the end": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "not a safetensors"),
    "size not its shape": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(8), "not a safetensors"),
    "no tensors": ({}, b"", "a safetensors model holds tensors, this one none"),
    "header not JSON": (None, bytes(8), "not a safetensors"),
}


@pytest.mark.parametrize("case", BAD_ST.values(), ids=BAD_ST.keys())
def test_a_safetensors_model_that_is_not_whole_is_refused(vendor, tmp_path, case):
    header, data, message = case
    folder = _st_folder(tmp_path / "hf", header or {}, data)
    if header is None:
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", 8) + b"not json" + data)
    for model in (folder, folder / "model.safetensors"):
        with pytest.raises(CodemoatError, match=message) as e:
            vendor.seal(model, "acme", tmp_path / "a.moat")
        assert "model.safetensors" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "a.moat").exists()
    assert vendor.find_customer("acme") is None and _models(vendor) == 0


def test_a_whole_safetensors_model_seals(vendor, tmp_path):
    folder = _st_folder(tmp_path / "hf", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    sealed = vendor.seal(folder, "acme", tmp_path / "a.moat")
    assert sealed.manifest.format == "safetensors"
    assert (vendor.unseal(sealed.path, tmp_path / "out") / "model.safetensors").read_bytes() == (
        folder / "model.safetensors"
    ).read_bytes()


def test_seal_model_itself_refuses_what_vendor_seal_refuses(tmp_path):
    """`seal_model` (what `Vendor.seal` calls, and any other caller) checks too, not only its callers."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from codemoat.vault.seal_model import seal_model

    kw = dict(signing_key=Ed25519PrivateKey.generate(), customer="acme", customer_id="c1", fingerprint_secret=b"s" * 32)
    short = truncated(write_gguf(tmp_path / "w.gguf"), tmp_path / "short.gguf", 0.5)
    empty = _st_folder(tmp_path / "hf", {}, b"")
    for bad, message in ((short, "not a valid GGUF file"), (empty, "holds tensors, this one none")):
        with pytest.raises(CodemoatError, match=message):
            seal_model(bad, tmp_path / "a.moat", **kw)
        assert not (tmp_path / "a.moat").exists()
    sealed, _, fmt = seal_model(tmp_path / "w.gguf", tmp_path / "a.moat", **kw)
    assert fmt == "gguf" and sealed.manifest.plaintext_size == (tmp_path / "w.gguf").stat().st_size
