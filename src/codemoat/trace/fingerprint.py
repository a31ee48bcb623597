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
"""

from __future__ import annotations

import numpy as np

from ..errors import CodemoatError

ALPHA = 0.01
_INFO = b"codemoat/fingerprint/v1/"


def tensor_key(secret: bytes, name: str) -> bytes:
    """The AES-256 key of one tensor's pattern: HKDF-SHA256(secret, info = version ‖ tensor name)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO + name.encode()).derive(secret)


def pattern(secret: bytes, name: str, n_cols: int, row0: int, row1: int) -> np.ndarray:
    """b[row0:row1] of tensor `name`: float32 ±1 of shape (row1 - row0, n_cols)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    blocks = -(-n_cols // 128)  # AES blocks (128 bits) per row
    counter = (row0 * blocks).to_bytes(16, "big")
    enc = Cipher(algorithms.AES(tensor_key(secret, name)), modes.CTR(counter)).encryptor()
    stream = enc.update(bytes((row1 - row0) * blocks * 16))
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8)).reshape(row1 - row0, blocks * 128)
    return bits[:, :n_cols].astype(np.float32) * 2.0 - 1.0


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


def fingerprint_model(data: bytes, fmt: str, secret: bytes, alpha: float = ALPHA) -> bytes:
    """The model `data` (fmt "gguf" or "safetensors") with the customer's fingerprint embedded.

    GGUF: F32, F16, BF16 and Q8_0 matrices are marked and re-encoded in their own type, so the
    file keeps its layout and metadata. Other quantisations cannot carry a mark at this amplitude
    (their rounding step is larger than it): fingerprint the F16 model first, then quantise.
    """
    if len(secret) < 16:
        raise CodemoatError("fingerprint secret must be at least 16 bytes")
    if fmt == "gguf":
        return _fingerprint_gguf(data, secret, alpha)
    if fmt == "safetensors":
        from . import st_io

        def change(name: str, values: np.ndarray) -> np.ndarray | None:
            return embed(values, secret, name, alpha) if eligible(values.shape) else None

        return st_io.rewrite(data, change)
    raise CodemoatError(f"unknown model format {fmt!r} (expected 'gguf' or 'safetensors')")


def _fingerprint_gguf(data: bytes, secret: bytes, alpha: float) -> bytes:
    from . import gguf_io

    marked = skipped = 0
    with gguf_io.open_gguf(data, writable=True) as r:
        for t in r.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if not eligible(shape):
                continue
            if t.tensor_type.name not in gguf_io.EMBEDDABLE:
                skipped += t.n_elements
                continue
            gguf_io.write_tensor(t, embed(gguf_io.dequantize(t), secret, t.name, alpha))
            marked += t.n_elements
        if marked < skipped or marked == 0:
            raise CodemoatError(
                "this GGUF is mostly quantised below Q8_0, which cannot carry a fingerprint: "
                "seal the F16/BF16/Q8_0 model, or fingerprint it and then quantise"
            )
        return bytes(r.data)


def marked_tensors(kinds: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Names `fingerprint_model` marks in a GGUF with these tensor types and shapes."""
    from .gguf_io import EMBEDDABLE

    return [n for n, s in shapes.items() if eligible(s) and kinds.get(n, "F32") in EMBEDDABLE]
