"""Reading a GGUF to seal it holds the model once. Checking the header actually read (`seal_model._same_gguf`) read
the file's first 32 MiB blocks into a buffer, then yielded a copy of it: `read_model` held a 253 MB model plus ~130 MB
(476 MB peak RSS against 345 MB before) and the streamed seal ~65 MB more (reviewer, session 25). Measured here in bytes
Python allocates (`tracemalloc`), not in time: a model smaller than one block was held three times over."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest
from ggufs import write_gguf

from codemoat.errors import CodemoatError
from codemoat.vault.seal_model import gguf_pieces, read_model


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_read_model_holds_the_model_once(tmp_path):
    model = write_gguf(tmp_path / "m.gguf", 4 << 20, seed=3)
    size = model.stat().st_size
    kept = []
    assert _peak(lambda: kept.append(read_model(model))) < size + (2 << 20)  # the header parsed aside
    assert bytes(kept[0][2]) == model.read_bytes()  # and it is the file


def test_a_streamed_seal_holds_one_block_read_not_the_header_twice_beside_it(tmp_path):
    model = write_gguf(tmp_path / "m.gguf", 4 << 20, seed=4)
    size = model.stat().st_size
    pieces, _ = gguf_pieces(model, None, b"")
    seen = []

    def consume() -> None:
        for p in pieces():
            seen.append(len(p))

    assert (
        _peak(consume) < (32 << 20) + size + (1 << 20)
    )  # a 32 MiB read (what `read` is asked for), as before the check  # one block read (32 MiB asked of `read`), the header aside
    assert sum(seen) == size


def test_a_swapped_model_is_still_refused_by_read_model(tmp_path):
    """The negative beside it: holding less still checks the header of the bytes read."""
    model = write_gguf(tmp_path / "m.gguf", 20_000, seed=5)
    size = model.stat().st_size
    pieces, _ = gguf_pieces(model, None, b"")  # checked by its path
    other = model.with_suffix(".new")
    other.write_bytes(os.urandom(size))
    os.replace(other, model)
    with pytest.raises(CodemoatError, match=r"m\.gguf: changed while it was read"):
        list(pieces())
    with pytest.raises(CodemoatError, match=r"m\.gguf"):
        read_model(model)


def test_a_grown_model_is_refused_by_read_model(tmp_path):
    """A file that grew after its check is not read as the size checked (the bytes past it are not dropped)."""
    model: Path = write_gguf(tmp_path / "m.gguf", 20_000, seed=6)
    data = model.read_bytes()
    from codemoat.vault import seal_model

    real = seal_model._whole_gguf

    def grow_after_check(path, what):
        got = real(path, what)
        with open(path, "ab") as f:
            f.write(b"x" * 100)
        return got

    seal_model._whole_gguf = grow_after_check
    try:
        with pytest.raises(CodemoatError, match=r"m\.gguf: changed while it was read"):
            read_model(model)
    finally:
        seal_model._whole_gguf = real
    assert model.read_bytes() == data + b"x" * 100
