"""safetensors tensors as float32 arrays, and rewriting them in place.

The format (https://huggingface.co/docs/safetensors) is an 8-byte little-endian header length,
a JSON header of name → {dtype, shape, data_offsets}, then the raw bytes. Rewriting keeps every
dtype and offset, so the header is untouched. BF16 is handled by hand (numpy has no bfloat16):
its bits are the top half of a float32's.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct

import numpy as np

from ..errors import CodemoatError

_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


#: The longest header read: the safetensors crate's own limit (`MAX_HEADER_SIZE` in its tensor.rs,
#: which `safetensors.torch.load` applies too). A real model's header is ~100 KB to a few MB.
MAX_HEADER = 100_000_000

#: The most JSON values a header may hold, counted before it is decoded (`_check_values`). Python builds
#: an object of 30-100 bytes for each, so a 100 MB header of `[{},{},...]` took 2.5 GB to refuse. A
#: tensor's entry holds 6 + ndim of them: this admits some 250,000 tensors (DeepSeek-V3, among the
#: largest models published, has ~91,000 in all its shards: 58 MoE layers x 256 experts x 3 matrices,
#: each with its scales).
MAX_VALUES = 2_000_000

_OBJECT_START = re.compile(rb"[ \t\n\r]*\{")


def _bad(why: str) -> CodemoatError:
    return CodemoatError(f"not a safetensors file: {why}")


def header_length(first8: bytes, size: int) -> int:
    """The header length a safetensors file of `size` bytes starts with (`first8`), checked to fit."""
    if len(first8) < 8:
        raise _bad("too short")
    (n,) = struct.unpack("<Q", first8)
    if n > MAX_HEADER:
        raise _bad(f"header length {n} over the {MAX_HEADER}-byte limit")
    if n > size - 8:
        raise _bad("header length past the end")
    return n


def _check_values(raw: bytes) -> None:
    """Refuse, before decoding, a header that is not a JSON object or holds more than `MAX_VALUES`
    values. Every JSON value but the first of its array or object follows a comma, and every array
    or object opens with a bracket, so commas plus opening brackets bound the values from above (those
    inside strings only count too many). Four scans at memchr speed; nothing is built."""
    if not _OBJECT_START.match(raw):
        raise _bad("header is not a JSON object")
    n = raw.count(b",") + raw.count(b"{") + raw.count(b"[")
    if n > MAX_VALUES:
        raise _bad(f"header holds more than {MAX_VALUES} JSON values (a real model's: about 8 per tensor)")


def parse_header(raw: bytes, data_len: int) -> dict:
    """A safetensors JSON header, checked: name -> {dtype, shape, data_offsets} inside the `data_len`
    bytes after it (`__metadata__` dropped). Anything else is one `CodemoatError` naming what is wrong,
    and a hostile header is refused before it is decoded into more than `MAX_VALUES` objects."""
    _check_values(raw)
    try:
        head = json.loads(raw)
    except RecursionError:  # a hostile header of deeply nested brackets
        raise _bad("header nested deeper than the JSON decoder goes") from None
    except ValueError:
        raise _bad("header is not JSON") from None
    if not isinstance(head, dict):
        raise _bad("header is not a JSON object")
    head.pop("__metadata__", None)
    for name, info in head.items():
        if not _entry_ok(info, data_len):
            raise _bad(f"header entry {name[:60]!r} is not a dtype, shape and data_offsets inside the file")
    return head


def _entry_ok(info, data_len: int) -> bool:
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        return False
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return False
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        return False
    a, b = offsets
    dt = _NP.get(info["dtype"])
    return 0 <= a <= b <= data_len and (dt is None or b - a == math.prod(shape) * np.dtype(dt).itemsize)


def buffer_header(buf: memoryview) -> tuple[dict, int]:
    """The checked header of the safetensors file in `buf`, and where its tensor data starts in `buf`."""
    n = header_length(bytes(buf[:8]), len(buf))
    return parse_header(bytes(buf[8 : 8 + n]), len(buf) - 8 - n), 8 + n


def read_header(path: str | os.PathLike[str]) -> dict:
    """The checked header of a safetensors file, read without the tensors."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = header_length(f.read(8), size)
        return parse_header(f.read(n), size - 8 - n)


def _load(src: bytes | str | os.PathLike[str]) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    with open(src, "rb") as f:
        return f.read()


def _view(buf, base: int, info: dict) -> np.ndarray | None:
    dt = _NP.get(info["dtype"])
    if dt is None:
        return None
    a, b = info["data_offsets"]
    return np.frombuffer(buf, dtype=dt, count=(b - a) // np.dtype(dt).itemsize, offset=base + a).reshape(info["shape"])


def _to_f32(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def _from_f32(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":  # round to nearest even, as torch does
        u = values.astype(np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return values.astype(_NP[dtype])


def read_matrices(src: bytes | str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every F32/F16/BF16 tensor of two or more dimensions, as float32."""
    buf = _load(src)
    head, base = buffer_header(memoryview(buf))
    out = {}
    for name, info in head.items():
        if len(info["shape"]) >= 2 and (arr := _view(buf, base, info)) is not None:
            out[name] = _to_f32(arr, info["dtype"])
    return out


def rewrite(data: bytes, change) -> bytes:
    """Call `change(name, values_f32) -> new values or None` on each float matrix; return the new file."""
    buf = bytearray(data)
    head, base = buffer_header(memoryview(buf))
    for name, info in head.items():
        if len(info["shape"]) < 2 or (arr := _view(buf, base, info)) is None:
            continue
        new = change(name, _to_f32(arr, info["dtype"]))
        if new is not None:
            arr[...] = _from_f32(new, info["dtype"]).reshape(arr.shape)
    return bytes(buf)
