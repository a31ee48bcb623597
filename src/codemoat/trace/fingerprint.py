"""Per-customer weight fingerprints: a keyed spread-spectrum pattern added to every weight matrix.

Method. Spread-spectrum watermarking (Cox, Kilian, Leighton, Shamoon 1997, "Secure spread
spectrum watermarking for multimedia") hides a long pseudorandom ±1 sequence at low amplitude
across many coefficients; a detector that knows the sequence integrates over all of them, so the
mark survives noise far larger than itself. Uchida et al. 2017 ("Embedding watermarks into deep
neural networks") and DeepMarks (Chen et al. 2019, one fingerprint per user of a model) carry the
idea into network weights. We embed without retraining and detect non-blind (the vendor keeps the
original), which is the strongest setting:

    W'_ij = W_ij + α · σ_i · b_ij

    W      (n_out, n_in) a weight matrix, row i = one output unit
    σ_i    RMS of row i of the original W (the mark is the same relative size in every row)
    b_ij   ∈ {-1, +1}, from AES-256-CTR keyed with HKDF(customer secret, tensor name)
    α      relative amplitude, 0.01 by default (bench/results/trace.md measures its cost)

Independent ±1 codes are also the anti-collusion baseline: averaging k customers' copies leaves
each code at amplitude α/k, which the detector still names (bench: "average of two copies").

Row i of b starts at AES-CTR block i·⌈n_in/128⌉, so the detector can regenerate any range of
rows without the others.

Quantised tensors (Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K) cannot take an additive mark of 1% of
a row's RMS: their rounding step is larger than that, and re-rounding a marked value returns the
original code. They carry a sparse mark in the integer codes instead (quant.py): in every segment
of 2^20 weights (a smaller tensor: one segment, its size rounded up to a power of two), 32
positions P drawn from AES-256-CTR (key HKDF(secret, "sel" ‖ tensor name))
have their code moved by one step in the direction of a keyed sign b_k,

    q'_k = q_k + b_k · sign(step_k)     (k ∈ P; left alone where q'_k would leave the code range)

with every block scale kept, so a changed weight moves by exactly one step |step_k|. The added
error is one weight in 32,768 moved by one step, against the uniform ±step/2 rounding error every
weight already has: step²/32,768 next to step²/12 of mean squared error, 0.04% of the
quantisation's own noise. It is quantisation index modulation (Chen & Wornell 2001, "Quantization
index modulation: a class of provably good methods for digital watermarking") in its simplest
form, one step either way; trace_stream.py correlates the suspect's residual at P with b, so the
rest of the tensor adds no noise to the score.

Streaming. `stream_gguf(path, secret)` yields the marked file piece by piece (header, then each
tensor in row blocks of ≤ 32 MiB of float32), reading with `pread`: memory stays at one row block
whatever the model's size, and `Vendor.seal` encrypts the pieces as they come.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CodemoatError

ALPHA = 0.01
SEGMENT = 1 << 20  # weights per segment of the sparse (quantised) mark
PER_SEGMENT = 32  # positions drawn per segment: p = 1/32,768 (bench/results/scale.md measures its KL)
_INFO = b"codemoat/fingerprint/v1/"
_INFO_SEL = b"codemoat/fingerprint/v1/sel/"
_SEG_BYTES = 4 * PER_SEGMENT + 16  # 32 32-bit offsets, then 32 sign bits (and 12 spare bytes)


def tensor_key(secret: bytes, name: str, info: bytes = _INFO) -> bytes:
    """The AES-256 key of one tensor's pattern: HKDF-SHA256(secret, info = version ‖ tensor name)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info + name.encode()).derive(secret)


def _ctr(key: bytes, block0: int, nbytes: int) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(key), modes.CTR(block0.to_bytes(16, "big"))).encryptor()
    return enc.update(bytes(nbytes))


def segment_size(total: int) -> int:
    """Weights per segment in a tensor of `total` weights: SEGMENT, or the power of two ≥ total
    (at least 4,096) for a smaller tensor, so that every tensor carries up to PER_SEGMENT positions."""
    return min(SEGMENT, max(4096, 1 << max(0, total - 1).bit_length()))


def selection(secret: bytes, name: str, n: int, seg0: int, seg1: int, total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The sparse mark's positions (flat indices < n, ascending within a segment) and signs (±1, int8)
    in segments seg0..seg1-1 of tensor `name` of `total` weights (default n). A position drawn twice
    in a segment is dropped."""
    seg = segment_size(total or n)
    if seg1 <= seg0:
        return np.empty(0, np.int64), np.empty(0, np.int8)
    stream = _ctr(tensor_key(secret, name, _INFO_SEL), seg0 * (_SEG_BYTES // 16), (seg1 - seg0) * _SEG_BYTES)
    raw = np.frombuffer(stream, np.uint8).reshape(seg1 - seg0, _SEG_BYTES)
    offsets = raw[:, : 4 * PER_SEGMENT].copy().view("<u4") & np.uint32(seg - 1)
    signs = np.unpackbits(raw[:, 4 * PER_SEGMENT : 4 * PER_SEGMENT + PER_SEGMENT // 8], axis=1)
    order = np.argsort(offsets, axis=1, kind="stable")
    offsets = np.take_along_axis(offsets, order, axis=1).astype(np.int64)
    signs = np.take_along_axis(signs, order, axis=1)
    same = offsets[:, 1:] == offsets[:, :-1]
    dup = np.zeros(offsets.shape, bool)
    dup[:, 1:] |= same
    dup[:, :-1] |= same
    pos = offsets + (np.arange(seg0, seg1, dtype=np.int64) * seg)[:, None]
    keep = ~dup & (pos < n)
    return pos[keep], (signs[keep].astype(np.int8) * 2 - 1)


def pattern(secret: bytes, name: str, n_cols: int, row0: int, row1: int) -> np.ndarray:
    """b[row0:row1] of tensor `name`: float32 ±1 of shape (row1 - row0, n_cols)."""
    return pattern_bits(secret, name, n_cols, row0, row1).astype(np.float32) * 2.0 - 1.0


def pattern_bits(secret: bytes, name: str, n_cols: int, row0: int, row1: int) -> np.ndarray:
    """The bits behind `pattern`: uint8 1 for +1, 0 for -1."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    blocks = -(-n_cols // 128)  # AES blocks (128 bits) per row
    counter = (row0 * blocks).to_bytes(16, "big")
    enc = Cipher(algorithms.AES(tensor_key(secret, name)), modes.CTR(counter)).encryptor()
    stream = enc.update(bytes((row1 - row0) * blocks * 16))
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8)).reshape(row1 - row0, blocks * 128)
    return bits[:, :n_cols]


def scheme(kind: str) -> str | None:
    """How a tensor of this type is marked: "dense" (float types), "sparse" (codes), or None."""
    from .quant import CODE_KINDS, FLOAT_KINDS

    return "dense" if kind in FLOAT_KINDS else "sparse" if kind in CODE_KINDS else None


def as_matrix(w: np.ndarray) -> np.ndarray:
    """A tensor as (rows, last dim): 3-D expert stacks become one tall matrix."""
    return w.reshape(-1, w.shape[-1])


def eligible(shape: tuple[int, ...]) -> bool:
    """Matrices large enough to carry a mark: ≥ 2-D, rows of ≥ 32 values, ≥ 1024 values."""
    return len(shape) >= 2 and shape[-1] >= 32 and int(np.prod(shape)) >= 1024


def row_scale(w: np.ndarray) -> np.ndarray:
    """σ_i: the RMS of each row, shape (rows, 1)."""
    w = as_matrix(w)
    return np.sqrt(np.mean(np.square(w, dtype=np.float64), axis=1, keepdims=True)).astype(np.float32)


def embed(w: np.ndarray, secret: bytes, name: str, alpha: float = ALPHA) -> np.ndarray:
    """W + α·σ·b for one tensor (any shape with ≥ 2 dims); returns a new float32 array."""
    m = as_matrix(w).astype(np.float32)
    b = pattern(secret, name, m.shape[1], 0, m.shape[0])
    return (m + alpha * row_scale(m) * b).reshape(w.shape)


#: tensors left unmarked: see `marks`
UNMARKED: tuple[str, ...] = ()


def marks(name: str, kind: str, shape: tuple[int, ...]) -> str | None:
    """The scheme tensor `name` of this type and shape is marked with ("dense", "sparse"), or None."""
    if not eligible(shape) or name in UNMARKED:
        return None
    return scheme(kind)


def mark_rows(
    raw: np.ndarray, kind: str, how: str, secret: bytes, name: str, cols: int, row0: int, total: int, alpha: float = ALPHA
) -> np.ndarray:
    """Rows row0.. of a tensor as stored (uint8 (rows, row_bytes)) with the mark: a new array for
    "dense", `raw` changed in place for "sparse"."""
    from . import quant

    rows = raw.shape[0]
    if how == "dense":  # W + α·σ·b, with one temporary: ±α·σ chosen by b's bits
        w = quant.to_float(raw, kind, cols)
        step = (alpha * np.sqrt(np.einsum("ij,ij->i", w, w) / cols))[:, None].astype(np.float32)
        w += np.where(pattern_bits(secret, name, cols, row0, row0 + rows).view(bool), step, -step)
        return quant.from_float(w, kind).reshape(rows, -1)
    L = quant.LAYOUTS[kind]
    lo, hi = row0 * cols, (row0 + rows) * cols
    seg = segment_size(total)
    pos, sign = selection(secret, name, hi, lo // seg, -(-hi // seg), total)
    inside = pos >= lo
    pos, sign = pos[inside] - lo, sign[inside]
    blocks = raw.reshape(-1, L.nbytes)
    bi, ei = pos // L.block, pos % L.block
    q, step = quant.codes_at(blocks, kind, bi, ei)
    q_new = q + sign * np.sign(step).astype(np.int16)
    ok = (step != 0) & (q_new >= L.qmin) & (q_new <= L.qmax)
    quant.set_codes_at(blocks, kind, bi[ok], ei[ok], q_new[ok])
    return raw


def fingerprint_model(data: bytes, fmt: str, secret: bytes, alpha: float = ALPHA) -> bytes:
    """The model `data` (fmt "gguf" or "safetensors") with the customer's fingerprint embedded.

    GGUF: float matrices get the dense mark, quantised ones (Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K)
    the sparse one, each in its own type, so the file keeps its layout and metadata. For a GGUF
    file on disk, `stream_gguf` does the same in bounded memory (what `Vendor.seal` uses).
    """
    if len(secret) < 16:
        raise CodemoatError("fingerprint secret must be at least 16 bytes")
    if fmt == "gguf":
        fd = os.memfd_create("codemoat-gguf", os.MFD_CLOEXEC)
        try:
            mv, written = memoryview(data), 0
            while written < len(mv):
                written += os.write(fd, mv[written:])
            return b"".join(stream_gguf(f"/proc/self/fd/{fd}", secret, alpha, name="the GGUF in memory").pieces())
        finally:
            os.close(fd)
    if fmt == "safetensors":
        from . import st_io

        def change(name: str, values: np.ndarray) -> np.ndarray | None:
            return embed(values, secret, name, alpha) if eligible(values.shape) else None

        return st_io.rewrite(data, change)
    raise CodemoatError(f"unknown model format {fmt!r} (expected 'gguf' or 'safetensors')")


@dataclass
class MarkedGGUF:
    """A GGUF file with a customer's mark, produced piece by piece (twice if asked: it is deterministic)."""

    path: Path
    size: int
    pieces: Callable[[], Iterator[memoryview]]
    marked: int  # weights in marked tensors


def stream_gguf(
    path: str | os.PathLike[str], secret: bytes, alpha: float = ALPHA, name: str | None = None, block_bytes: int = 32 << 20
) -> MarkedGGUF:
    """The marked copy of the GGUF file at `path`, as pieces of bytes in file order (see module doc)."""
    from .gguf_stream import GGUFFile

    if len(secret) < 16:
        raise CodemoatError("fingerprint secret must be at least 16 bytes")
    with GGUFFile(path, name) as g:
        plan = [(t, marks(t.name, t.kind, t.shape)) for t in sorted(g.tensors, key=lambda t: t.offset)]
        size = g.file_size
    marked = sum(t.size for t, how in plan if how)
    if marked == 0:
        raise CodemoatError(
            "this GGUF has no tensor that can carry a fingerprint (F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q4_K, Q5_K or Q6_K matrices)"
        )

    planned = [_layout(t) for t, _ in plan]

    def pieces() -> Iterator[memoryview]:
        with GGUFFile(path, name) as g:
            # the file is opened again: one swapped meanwhile for another of the same size had the plan's marks
            # written over whatever tensors it held, and was sealed with a header that did not match its data
            if g.file_size != size or sorted(map(_layout, g.tensors), key=lambda x: x[3]) != planned:
                raise CodemoatError(f"{name or path}: changed while it was read (its tensors are not those it was checked with)")
            at = 0
            for t, how in plan:
                yield from _copy(g, at, t.offset, block_bytes)
                if how is None:
                    yield from _copy(g, t.offset, t.offset + t.nbytes, block_bytes)
                else:
                    for r0, r1 in g.row_blocks(t, block_bytes):
                        yield memoryview(
                            mark_rows(g.raw_rows(t, r0, r1), t.kind, how, secret, t.name, t.cols, r0, t.size, alpha)
                        ).cast("B")
                at = t.offset + t.nbytes
            yield from _copy(g, at, g.file_size, block_bytes)

    return MarkedGGUF(Path(path), size, pieces, marked)


def _layout(t: Any) -> tuple:
    """What a tensor's marking depends on: name, kind, shape, and where its bytes lie."""
    return (t.name, t.kind, tuple(t.shape), t.offset, t.nbytes)


def _copy(g, lo: int, hi: int, block: int) -> Iterator[memoryview]:
    for a in range(lo, hi, block):
        yield memoryview(g.read(a, min(block, hi - a)))


fingerprint_model.stream = stream_gguf  # type: ignore[attr-defined]  # Vendor.seal streams GGUF files through it
