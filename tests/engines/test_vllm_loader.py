"""The vLLM worker's reader of the sealed safetensors (`engines.vllm_loader.safetensors_tensors`), fed hostile
headers: it used its own parser, which let a header of deeply nested brackets escape as RecursionError, a JSON
list as AttributeError, an entry without offsets as KeyError, and a tensor whose bytes do not make its shape as
torch's RuntimeError. It now uses trace.st_io's checked parser: each is one `CodemoatError`."""

from __future__ import annotations

import json
import struct

import pytest

from codemoat.errors import CodemoatError

torch = pytest.importorskip("torch")


def _file(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _tensors(blob: bytes, pad: int = 3) -> dict:
    from codemoat.engines.vllm_loader import safetensors_tensors

    view = memoryview(b"\0" * pad + blob)  # the file sits at an offset in the memfd, as a part of the bundle
    return dict(safetensors_tensors(view, pad, len(blob)))


def test_a_safetensors_part_is_read_as_zero_copy_tensors():
    data = struct.pack("<4f", 1, 2, 3, 4) + struct.pack("<2i", 7, -8)
    header = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "n": {"dtype": "I32", "shape": [2], "data_offsets": [16, 24]},
        "e": {"dtype": "BF16", "shape": [0], "data_offsets": [24, 24]},
    }
    got = _tensors(_file(json.dumps(header).encode(), data))
    assert got["w"].tolist() == [[1, 2], [3, 4]] and got["n"].tolist() == [7, -8] and got["e"].shape == (0,)


@pytest.mark.parametrize(
    "blob,why",
    [
        (b"\x01\x02", "too short"),
        (_file(b"{}")[:-1], "header length past the end"),
        (_file(b'{"a":' + b"[" * 100_000), "nested deeper"),  # an object: a bare array is refused before decoding
        (_file(b"[]"), "not a JSON object"),
        (_file(b"{not json"), "not JSON"),
        (_file(json.dumps({"w": {"dtype": "F32", "shape": [1]}}).encode(), b"\0" * 4), "header entry 'w'"),
        (_file(json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}).encode(), b"\0" * 4), "'w'"),
        (_file(json.dumps({"w": {"dtype": "I32", "shape": [3], "data_offsets": [0, 8]}}).encode(), b"\0" * 8), "shape"),
        (_file(json.dumps({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode(), b"\0" * 8), "C64"),
    ],
    ids=["short", "length", "deep", "list", "text", "no-offsets", "past-end", "size", "dtype"],
)
def test_a_hostile_header_is_one_line(blob, why):
    with pytest.raises(CodemoatError, match=why) as e:
        _tensors(blob)
    assert "\n" not in str(e.value)
