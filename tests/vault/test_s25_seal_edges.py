"""Sealing's edges. A big-endian GGUF was refused as "truncated or not a valid GGUF file": it is now named for what it
is. And the model was checked by its path, then opened again and read: a file swapped for another of the same size in
between was sealed unchecked (only the size was compared). Now the header of the bytes read is checked again before
any is sealed (`seal_model._same_gguf`), without reading the model a second time."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from ggufs import write_gguf
from vaulthelp import one_line_error

from codemoat.errors import CodemoatError
from codemoat.vault.seal_model import check_model, gguf_pieces, read_model


def _big_endian(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_name(path.stem)
    w.add_tensor("blob.weight", np.ones((16, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_big_endian_gguf_is_named_as_such(tmp_path):
    model = _big_endian(tmp_path / "be.gguf")
    with pytest.raises(CodemoatError, match=r"be\.gguf: big-endian GGUF is not supported"):
        check_model(model)


def test_vendor_seal_says_big_endian_in_one_line(tmp_path, vendor):
    model, out = _big_endian(tmp_path / "be.gguf"), tmp_path / "a.moat"
    r = run_cli("vendor", "seal", str(model), "--vendor", str(vendor.root), "--customer", "acme", "--out", str(out))
    one_line_error(r, "big-endian GGUF is not supported")
    assert not out.exists()


@pytest.mark.parametrize("head", [b"GGUF\0\0\0\0", b"GGUF\x03\0\0\0", b"GGUG\0\0\0\x03"])
def test_other_bad_headers_are_not_called_big_endian(tmp_path, head):
    """The negative: version 0, a little-endian header cut short, another magic: the parse's own words."""
    model = tmp_path / "bad.gguf"
    model.write_bytes(head + os.urandom(200))
    with pytest.raises(CodemoatError, match="truncated or not a valid GGUF file") as e:
        check_model(model)
    assert "big-endian" not in str(e.value)


def _swap(model: Path, data: bytes) -> None:
    """`model` replaced, as a rename replaces it, by a file of `data` (the same size)."""
    other = model.with_suffix(".new")
    other.write_bytes(data)
    os.replace(other, model)


@pytest.mark.parametrize("swapped", ["random bytes", "header cut", "another header size"])
def test_a_gguf_swapped_after_its_check_is_not_sealed(tmp_path, swapped):
    model = write_gguf(tmp_path / "m.gguf", 20_000, seed=1)
    size = model.stat().st_size
    pieces, checked = gguf_pieces(model, None, b"")  # checked: the whole model, by its path
    assert checked == size
    if swapped == "random bytes":
        data = os.urandom(size)
    elif swapped == "header cut":
        data = model.read_bytes()[:40] + os.urandom(size - 40)
    else:  # a valid GGUF whose header is longer, cut to the same size: its tensor runs past the end
        longer = write_gguf(tmp_path / "a-much-longer-name-for-its-general-name-key.gguf", 20_000, seed=1).read_bytes()
        data = longer[:size]
    _swap(model, data)
    with pytest.raises(CodemoatError, match=r"m\.gguf: changed while it was read"):
        list(pieces())


def test_an_unchanged_gguf_is_read_and_streamed_as_it_is(tmp_path):
    """The negative beside it: with no swap, the bytes streamed and read are the file's."""
    model = write_gguf(tmp_path / "m.gguf", 20_000, seed=2)
    pieces, size = gguf_pieces(model, None, b"")
    assert b"".join(pieces()) == model.read_bytes() and size == model.stat().st_size
    model_id, fmt, data, parts = read_model(model)
    assert (model_id, fmt, bytes(data)) == ("m", "gguf", model.read_bytes()) and parts[0]["size"] == size
