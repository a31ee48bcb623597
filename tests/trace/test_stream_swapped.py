"""The fingerprinted stream (`trace.fingerprint.stream_gguf`, what `vendor seal` seals by default) plans its marks
from one parse of the GGUF, then reads the file again as the sealer asks for its pieces. A file swapped meanwhile
for another of the same size (an F32 64x64 model for an F16 128x64 one) had the F32 plan's marks written over its
F16 rows, and was sealed: a damaged model whose fingerprint cannot be traced. It is refused now; an unchanged
file streams as before."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest

from codemoat.errors import CodemoatError
from codemoat.trace.fingerprint import stream_gguf
from codemoat.trace.gguf_stream import GGUFFile


def _write(path, arr) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("m")
    w.add_tensor("blob.weight", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _pair(tmp_path):
    a, b = tmp_path / "m.gguf", tmp_path / "other.gguf"
    _write(a, (np.random.default_rng(1).standard_normal((64, 64)) * 0.02).astype(np.float32))
    _write(b, (np.random.default_rng(2).standard_normal((128, 64)) * 0.02).astype(np.float16))
    assert a.stat().st_size == b.stat().st_size  # the same size: only a look at the tensors tells them apart
    return a, b


def test_a_gguf_swapped_after_its_plan_is_refused(tmp_path):
    a, b = _pair(tmp_path)
    marked = stream_gguf(a, b"s" * 32)
    os.replace(b, a)
    with pytest.raises(CodemoatError, match="changed while it was read"):
        b"".join(bytes(p) for p in marked.pieces())


def test_an_unchanged_gguf_streams_marked_with_its_own_layout(tmp_path):
    a, _ = _pair(tmp_path)
    marked = stream_gguf(a, b"s" * 32)
    out = tmp_path / "marked.gguf"
    out.write_bytes(b"".join(bytes(p) for p in marked.pieces()))
    assert out.stat().st_size == marked.size
    with GGUFFile(out, "marked") as g, GGUFFile(a, "orig") as o:
        assert [(t.name, t.kind, tuple(t.shape)) for t in g.tensors] == [(t.name, t.kind, tuple(t.shape)) for t in o.tensors]
        t = g.tensors[0]
        assert bytes(g.raw_rows(t, 0, 64)) != bytes(o.raw_rows(o.tensors[0], 0, 64))  # marked
