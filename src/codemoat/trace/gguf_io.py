"""GGUF tensors as float32 arrays, and rewriting them in place, with the `gguf` package.

Reading dequantises any type `gguf.quants` knows (F32, F16, BF16, Q4_0…Q8_0, the K-quants,
the IQ types), so a suspect of any quantisation llama.cpp can produce can be compared with the
original. Writing re-encodes a tensor in its own type (F32, F16, BF16, Q8_0: the types whose
encoders keep the byte size, so every offset and every metadata field stays exactly as it was).

Shapes are numpy order, the reverse of GGUF's `ne`: a linear layer is (n_out, n_in), one row per
output unit, like a PyTorch `nn.Linear.weight`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import CodemoatError

#: tensor types whose values `write_tensor` can change in place
EMBEDDABLE = ("F32", "F16", "BF16", "Q8_0")


def _reader(path: str | os.PathLike[str], mode: str = "r", name: str | None = None):
    from gguf import GGUFReader

    name = name or str(path)
    try:
        return GGUFReader(path, mode=mode)
    except OSError as e:
        raise CodemoatError(f"cannot read {name}: {e.strerror or e}") from None
    # A header cut short or damaged surfaces as whichever numpy or struct error its parse hit first
    # (an IndexError past the end, a ValueError on a bad type or size, a UnicodeDecodeError in a key).
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error):
        raise CodemoatError(f"{name}: truncated or not a valid GGUF file") from None


@contextmanager
def open_gguf(src: bytes | str | os.PathLike[str], writable: bool = False) -> Iterator:
    """A `gguf.GGUFReader` over a path, or over bytes held in a memfd (never a disk path).

    With `writable`, the mapping is copy-on-write: tensor arrays can be assigned to, and
    `bytes(reader.data)` is the changed file; the source is never modified.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        fd = os.memfd_create("codemoat-gguf", os.MFD_CLOEXEC)
        try:
            mv = memoryview(src)
            written = 0
            while written < len(mv):
                written += os.write(fd, mv[written:])
            yield _reader(f"/proc/self/fd/{fd}", "c" if writable else "r", "the GGUF in memory")
        finally:
            os.close(fd)
    else:
        yield _reader(Path(src), "c" if writable else "r")


def is_gguf(src: bytes | str | os.PathLike[str]) -> bool:
    """True when `src` (bytes or a path) starts with the GGUF magic."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src[:4]) == b"GGUF"
    with open(src, "rb") as f:
        return f.read(4) == b"GGUF"


def dequantize(t) -> np.ndarray:
    """The values of a `ReaderTensor` as float32 in numpy order (n_rows, n_cols)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if t.tensor_type == Q.F32:
        return np.array(t.data, dtype=np.float32).reshape(shape)
    if t.tensor_type == Q.F16:
        return np.asarray(t.data).astype(np.float32).reshape(shape)
    try:
        return quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
    except NotImplementedError:
        raise CodemoatError(f"tensor {t.name}: cannot dequantise type {t.tensor_type.name}") from None


def write_tensor(t, values: np.ndarray) -> None:
    """Re-encode `values` (float32, numpy order) into `t`'s own type, in place."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    kind = t.tensor_type.name
    if kind not in EMBEDDABLE:
        raise CodemoatError(f"tensor {t.name}: cannot re-encode type {kind}")
    if t.tensor_type == Q.F32:
        enc = values.astype(np.float32)
    elif t.tensor_type == Q.F16:
        enc = values.astype(np.float16)
    else:  # BF16 and Q8_0: raw bytes, one row of blocks per tensor row
        enc = quants.quantize(values.astype(np.float32), t.tensor_type)
    t.data[...] = enc.reshape(t.data.shape).view(t.data.dtype)


def tensor_kinds(reader) -> dict[str, str]:
    """Tensor name → type name (e.g. 'Q8_0')."""
    return {t.name: t.tensor_type.name for t in reader.tensors}


def read_matrices(src: bytes | str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict]:
    """Every tensor of two or more dimensions as float32 (numpy order), and the GGUF metadata
    that alignment needs (architecture, head counts)."""
    with open_gguf(src) as r:
        out = {t.name: dequantize(t) for t in r.tensors if len(t.shape) >= 2}
        meta = metadata(r)
    return out, meta


def metadata(reader) -> dict:
    """Scalar key/values of a GGUF (strings and numbers; arrays such as the vocabulary skipped)."""
    from gguf import GGUFValueType

    meta: dict = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError):
            continue
    return meta
