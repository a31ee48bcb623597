"""GGUF tensor bytes ↔ float32, and the integer codes inside quantisation blocks.

Dequantising uses llama.cpp's own C routines (`dequantize_row_<type>` in the libggml-base that
llama-cpp-python ships), called through ctypes on whole row blocks; `gguf.quants` (numpy) is the
fallback when the library is missing.

Codes. In every block type marked here a weight is an affine function of a small integer code q,
w = step·q + offset, where step and offset come from the block's (and for K-quants the
sub-block's) scales (llama.cpp `ggml-common.h`: block_q8_0, block_q4_0, block_q5_0, block_q4_K,
block_q5_K, block_q6_K). `codes_at` reads q and step at chosen positions, `set_codes_at` writes new
codes there and leaves every scale byte as it was, so one code moved by ±1 moves its weight by
exactly one quantisation step and nothing else in the block changes.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CodemoatError

FLOAT_KINDS = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class Layout:
    """Where code q of element e (0 ≤ e < block) lives: low bits and, for 5- and 6-bit codes, high bits."""

    block: int
    nbytes: int
    lo_byte: np.ndarray
    lo_shift: np.ndarray
    lo_bits: int
    hi_byte: np.ndarray | None
    hi_shift: np.ndarray | None
    hi_bits: int
    qmin: int
    qmax: int


def _layouts() -> dict[str, Layout]:
    e32, e256 = np.arange(32), np.arange(256)
    s, l = e256 // 32, e256 % 32  # K-quants: sub-block of 32, place in it
    h, rem = e256 // 128, e256 % 128  # Q6_K: two halves of 128
    return {
        # int8 codes (two's complement), d at bytes 0-1; ggml writes -127..127
        "Q8_0": Layout(32, 34, 2 + e32, 0 * e32, 8, None, None, 0, -127, 127),
        # d, then 16 bytes: element e < 16 in the low nibble of byte e, e ≥ 16 in the high nibble of e-16
        "Q4_0": Layout(32, 18, 2 + e32 % 16, 4 * (e32 // 16), 4, None, None, 0, 0, 15),
        # d, qh (bit e = fifth bit of element e), then nibbles as Q4_0
        "Q5_0": Layout(32, 22, 6 + e32 % 16, 4 * (e32 // 16), 4, 2 + e32 // 8, e32 % 8, 1, 0, 31),
        # d, dmin, 12 scale bytes, then 4 × 32 bytes: sub-blocks 2c and 2c+1 in the low/high nibbles
        "Q4_K": Layout(256, 144, 16 + (s // 2) * 32 + l, 4 * (s % 2), 4, None, None, 0, 0, 15),
        # as Q4_K with qh (32 bytes, bit s of byte l) before the nibbles
        "Q5_K": Layout(256, 176, 48 + (s // 2) * 32 + l, 4 * (s % 2), 4, 16 + l, s, 1, 0, 31),
        # ql (128 bytes), qh (64), 16 int8 scales, d: see dequantize_row_q6_K
        "Q6_K": Layout(256, 210, h * 64 + rem % 64, 4 * (rem // 64), 4, 128 + h * 32 + rem % 32, 2 * (rem // 32), 2, 0, 63),
    }


LAYOUTS = _layouts()
CODE_KINDS = tuple(LAYOUTS)


@functools.cache
def _ggml() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        lib = Path(folder) / "lib" / "libggml-base.so"
        if lib.exists():
            try:
                return ctypes.CDLL(str(lib))
            except OSError:
                return None
    return None


@functools.cache
def _dequantizer(kind: str):
    lib = _ggml()
    fn = getattr(lib, f"dequantize_row_{kind[0].lower()}{kind[1:]}", None) if lib is not None else None
    if fn is not None:
        fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
        fn.restype = None
    return fn


def to_float(raw: np.ndarray, kind: str, cols: int) -> np.ndarray:
    """Rows of a tensor as stored (uint8, (rows, row_bytes)) → float32 (rows, cols)."""
    rows = raw.shape[0]
    if kind == "F32":
        return raw.view(np.float32).reshape(rows, cols).copy()
    if kind == "F16":
        return raw.view(np.float16).reshape(rows, cols).astype(np.float32)
    if kind == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(rows, cols)
    out = np.empty((rows, cols), np.float32)
    fn = _dequantizer(kind)
    if fn is not None:
        src = np.ascontiguousarray(raw)
        fn(src.ctypes.data, out.ctypes.data, rows * cols)
        return out
    from gguf import GGMLQuantizationType, quants

    try:
        out[...] = quants.dequantize(raw, GGMLQuantizationType[kind]).reshape(rows, cols)
    except (NotImplementedError, KeyError):
        raise CodemoatError(f"cannot dequantise tensor type {kind}") from None
    return out


def from_float(values: np.ndarray, kind: str) -> np.ndarray:
    """float32 rows → bytes of a float type (F32, F16, BF16; BF16 rounded to nearest even)."""
    if kind == "F32":
        return values.astype(np.float32).view(np.uint8)
    if kind == "F16":
        return values.astype(np.float16).view(np.uint8)
    if kind == "BF16":
        u = values.astype(np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).view(np.uint8)
    raise CodemoatError(f"cannot encode tensor type {kind}")


def _steps(blocks: np.ndarray, kind: str, bi: np.ndarray, ei: np.ndarray) -> np.ndarray:
    """dw/dq of element ei of block bi."""
    if kind in ("Q8_0", "Q4_0", "Q5_0"):
        return blocks[bi, 0:2].copy().view(np.float16)[:, 0].astype(np.float32)
    if kind == "Q6_K":
        d = blocks[bi, 208:210].copy().view(np.float16)[:, 0].astype(np.float32)
        return d * blocks[bi, 192 + ei // 16].view(np.int8).astype(np.float32)
    # Q4_K, Q5_K: d · (6-bit scale of sub-block ei // 32); scale packing as in gguf.quants.Q4_K
    d = blocks[bi, 0:2].copy().view(np.float16)[:, 0].astype(np.float32)
    sc = blocks[bi, 4:16]
    j = ei // 32
    low = sc[np.arange(len(j)), np.where(j < 4, j, j + 4)]  # bytes 0-3 (j < 4) or 8-11 (j ≥ 4)
    high = sc[np.arange(len(j)), np.where(j < 4, 0, j - 4)]  # bytes 0-3 hold j ≥ 4's top bits
    s6 = np.where(j < 4, low & 0x3F, (low & 0x0F) | ((high >> 2) & 0x30))
    return d * s6.astype(np.float32)


def codes_at(blocks: np.ndarray, kind: str, bi: np.ndarray, ei: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q, step) of element ei of block bi; `blocks` is uint8 (n_blocks, block_bytes)."""
    L = LAYOUTS[kind]
    q = ((blocks[bi, L.lo_byte[ei]] >> L.lo_shift[ei].astype(np.uint8)) & ((1 << L.lo_bits) - 1)).astype(np.int16)
    if L.hi_byte is not None:
        hi = (blocks[bi, L.hi_byte[ei]] >> L.hi_shift[ei].astype(np.uint8)) & ((1 << L.hi_bits) - 1)
        q |= hi.astype(np.int16) << L.lo_bits
    if kind == "Q8_0":
        q = q.astype(np.uint8).view(np.int8).astype(np.int16)
    return q, _steps(blocks, kind, bi, ei)


def set_codes_at(blocks: np.ndarray, kind: str, bi: np.ndarray, ei: np.ndarray, q: np.ndarray) -> None:
    """Write codes q at (bi, ei) in place; scales and every other code stay as they are."""
    L = LAYOUTS[kind]
    flat = blocks.reshape(-1)
    base = bi.astype(np.int64) * blocks.shape[1]
    q = q.astype(np.int64) & 0xFF
    parts = [(L.lo_byte, L.lo_shift, L.lo_bits, q)]
    if L.hi_byte is not None:
        parts.append((L.hi_byte, L.hi_shift, L.hi_bits, q >> L.lo_bits))
    for byte, shift, bits, val in parts:
        idx = base + byte[ei]
        sh = shift[ei].astype(np.int64)
        mask = ((1 << bits) - 1) << sh
        # two chosen elements may share a byte: ufunc.at applies every update in turn
        np.bitwise_and.at(flat, idx, (~mask & 0xFF).astype(np.uint8))
        np.bitwise_or.at(flat, idx, (((val & ((1 << bits) - 1)) << sh) & 0xFF).astype(np.uint8))
