"""safetensors tensors as float32 arrays, and rewriting them in place.

The format (https://huggingface.co/docs/safetensors) is an 8-byte little-endian header length,
a JSON header of name → {dtype, shape, data_offsets}, then the raw bytes. Rewriting keeps every
dtype and offset, so the header is untouched. BF16 is handled by hand (numpy has no bfloat16):
its bits are the top half of a float32's.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from ..errors import CodemoatError

_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _header(buf: memoryview) -> tuple[dict, int]:
    if len(buf) < 8:
        raise CodemoatError("not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > len(buf) - 8 or n > 100_000_000:
        raise CodemoatError("not a safetensors file (header length past the end)")
    try:
        head = json.loads(bytes(buf[8 : 8 + n]))
    except ValueError:
        raise CodemoatError("not a safetensors file (header is not JSON)") from None
    head.pop("__metadata__", None)
    return head, 8 + n


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
    head, base = _header(memoryview(buf))
    out = {}
    for name, info in head.items():
        if len(info["shape"]) >= 2 and (arr := _view(buf, base, info)) is not None:
            out[name] = _to_f32(arr, info["dtype"])
    return out


def rewrite(data: bytes, change) -> bytes:
    """Call `change(name, values_f32) -> new values or None` on each float matrix; return the new file."""
    buf = bytearray(data)
    head, base = _header(memoryview(buf))
    for name, info in head.items():
        if len(info["shape"]) < 2 or (arr := _view(buf, base, info)) is None:
            continue
        new = change(name, _to_f32(arr, info["dtype"]))
        if new is not None:
            arr[...] = _from_f32(new, info["dtype"]).reshape(arr.shape)
    return bytes(buf)
