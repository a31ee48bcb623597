"""Which customer's copy is this? Score a suspect model against every customer's fingerprint.

Non-blind correlation detector (Cox et al. 1997, §IV): with the original W kept by the vendor,
the normalised residual of tensor t is

    r_ij = (S_ij - W_ij) / σ_i          S the suspect, re-aligned to W first (align.py)

and customer c's score on it is the correlation with c's pattern b^c (fingerprint.py)

    z_t = <r, b^c> / ||r||

Because b^c is a keyed pseudorandom ±1 sequence independent of r (for every customer but the
one whose mark r carries), <r, b^c> is a Rademacher sum, and Hoeffding's inequality bounds
P(z_t ≥ z) ≤ exp(-z²/2) whatever r is: quantisation noise, fine-tuning, pruning or an unrelated
model. Tensors are combined by Stouffer's weighted sum Z = Σ a_t z_t / √(Σ a_t²), with weights
a_t = √n_t · α / rms(r_t) (the z_t a mark of amplitude α would give) that depend on r only, so Z
keeps the same bound and

    p_c = exp(-Z²/2)  (Z > 0),   p_c,adj = min(1, N · p_c)  (Bonferroni over N customers)

and a customer is named only when p_c,adj < 1e-9. A clean copy (r = 0) scores Z = 0, p = 1.

The scores use up to `max_positions` weights (rows taken from the top of each tensor, in
proportion to its size), which bounds the work for 1,000 customers on a large model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import CodemoatError
from . import fingerprint as fp
from .align import align

THRESHOLD = 1e-9
MAX_POSITIONS = 4_000_000


def p_value(z: float) -> float:
    """Hoeffding's bound on P(Z ≥ z) for a normalised Rademacher sum: exp(-z²/2), 1 for z ≤ 0."""
    return 1.0 if z <= 0 else math.exp(-z * z / 2)


@dataclass
class Score:
    customer: str
    z: float
    p: float
    p_adj: float
    named: bool


@dataclass
class TraceResult:
    scores: list[Score]  # best first
    named: list[str]
    positions: int  # weights the scores integrate over
    tensors: int
    realigned: dict[str, int] = field(default_factory=dict)
    threshold: float = THRESHOLD

    def as_dict(self) -> dict:
        return {
            "named": self.named,
            "threshold": self.threshold,
            "positions": self.positions,
            "tensors": self.tensors,
            "realigned": self.realigned,
            "scores": [s.__dict__ for s in self.scores],
        }


CLIP = 4.0  # residuals beyond 4x their median magnitude count as 4x (robust)


@dataclass
class _Residual:
    name: str
    r: np.ndarray  # (rows, cols) float32, normalised residual of the scored rows
    weight: float  # a_t


def residuals(
    suspect: Mapping[str, np.ndarray],
    original: Mapping[str, np.ndarray],
    names: list[str],
    alpha: float = fp.ALPHA,
    max_positions: int = MAX_POSITIONS,
) -> list[_Residual]:
    """Normalised residuals r of the tensors both models share, over at most `max_positions` weights."""
    common = [n for n in names if n in suspect and suspect[n].shape == original[n].shape]
    if not common:
        raise CodemoatError("the suspect shares no weight matrix with the original (another architecture?)")
    total = sum(original[n].size for n in common)
    share = min(1.0, max_positions / total)
    out = []
    for n in common:
        w, s = fp.as_matrix(original[n]), fp.as_matrix(suspect[n])
        rows = max(1, min(w.shape[0], int(w.shape[0] * share)))
        sigma = fp.row_scale(w[:rows])
        r = robust(np.where(sigma > 0, (s[:rows] - w[:rows]) / np.where(sigma > 0, sigma, 1), 0).astype(np.float32))
        rms = float(np.sqrt(np.mean(np.square(r, dtype=np.float64))))
        if rms == 0 or not np.isfinite(rms):
            continue  # unchanged tensor: no evidence either way
        out.append(_Residual(n, r, math.sqrt(r.size) * alpha / rms))
    return out


def robust(r: np.ndarray) -> np.ndarray:
    """Residuals with NaN/Inf set to 0 and each clipped to CLIP x their median magnitude.

    A suspect shaped to evade: a few weights per matrix moved by 20 sigma (or set to NaN, Inf) made
    ||r|| dwarf the mark's energy, and z fell from 339 to 4.6 on the test model (no verdict). A clean
    mark's |r| is all alike (the step, or alpha sigma), so clipping changes nothing there; the clip
    depends on |r| alone, never on a customer's signs, so z of an unmarked customer is still a
    normalised Rademacher sum (the p-values hold)."""
    r = np.where(np.isfinite(r), r, 0).astype(r.dtype, copy=False)
    med = float(np.median(np.abs(r))) if r.size else 0.0
    if med > 0:
        np.clip(r, -CLIP * med, CLIP * med, out=r)
    return r


def score(res: list[_Residual], secret: bytes) -> float:
    """Z of one customer (Stouffer over tensors of z_t = <r, b> / ||r||)."""
    if not res:
        return 0.0
    num = 0.0
    for t in res:
        b = fp.pattern(secret, t.name, t.r.shape[1], 0, t.r.shape[0])
        z_t = float(np.dot(t.r.ravel(), b.ravel())) / float(np.linalg.norm(t.r))
        num += t.weight * z_t
    return num / math.sqrt(sum(t.weight**2 for t in res))


def trace(
    suspect: dict[str, np.ndarray],
    original: dict[str, np.ndarray],
    customers: Mapping[str, bytes],
    names: list[str] | None = None,
    meta: dict | None = None,
    alpha: float = fp.ALPHA,
    threshold: float = THRESHOLD,
    max_positions: int = MAX_POSITIONS,
) -> TraceResult:
    """Rank `customers` (name → fingerprint secret) by the evidence that `suspect` carries their mark.

    `names` are the tensors the fingerprint covers (default: every eligible matrix of `original`).
    `suspect` is re-aligned in place.
    """
    if not customers:
        raise CodemoatError("no customers registered: nothing to trace against")
    names = names if names is not None else [n for n, w in original.items() if fp.eligible(w.shape)]
    realigned = align(suspect, original, meta)
    res = residuals(suspect, original, names, alpha, max_positions)
    zs = {cname: score(res, secret) for cname, secret in customers.items()}
    return ranked(zs, threshold, positions=sum(t.r.size for t in res), tensors=len(res), realigned=realigned)


def ranked(zs: Mapping[str, float], threshold: float, *, positions: int, tensors: int, realigned: dict) -> TraceResult:
    """Customers best first by Z, each with p = exp(-Z²/2) Bonferroni-adjusted over all of them."""
    scores = []
    for cname, z in zs.items():
        p = p_value(z)
        p_adj = min(1.0, p * len(zs))
        scores.append(Score(cname, z, p, p_adj, p_adj < threshold))
    scores.sort(key=lambda s: -s.z)
    named = [s.customer for s in scores if s.named]
    return TraceResult(scores, named, positions, tensors, realigned, threshold)


def load(path_or_bytes, kind: str | None = None) -> tuple[dict[str, np.ndarray], dict, list[str] | None]:
    """Matrices of a GGUF or safetensors model, its metadata, and which tensors carry the dense mark."""
    from . import gguf_io, st_io
    from .gguf_stream import GGUFFile
    from .vendor_io import not_a_model, weights_path

    if not isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        path_or_bytes = weights_path(path_or_bytes)
    is_gguf = gguf_io.is_gguf(path_or_bytes) if kind is None else kind == "gguf"
    if is_gguf:
        if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
            with gguf_io.open_gguf(path_or_bytes) as r:
                mats = {t.name: gguf_io.dequantize(t) for t in r.tensors if len(t.shape) >= 2}
                kinds, meta = gguf_io.tensor_kinds(r), gguf_io.metadata(r)
        else:
            with GGUFFile(path_or_bytes) as g:
                mats = {t.name: g.matrix(t) for t in g.tensors if len(t.shape) >= 2}
                kinds, meta = {t.name: t.kind for t in g.tensors}, g.metadata
        return mats, meta, [n for n, w in mats.items() if fp.marks(n, kinds[n], w.shape) == "dense"]
    try:
        mats = st_io.read_matrices(path_or_bytes)
    except CodemoatError as e:
        name = "the model" if isinstance(path_or_bytes, (bytes, bytearray, memoryview)) else str(path_or_bytes)
        raise not_a_model(name, e) from None
    return mats, _hf_config(path_or_bytes), None


def _hf_config(path) -> dict:
    """config.json next to a safetensors file, if any (for head counts)."""
    import json
    from pathlib import Path

    if isinstance(path, (bytes, bytearray, memoryview)):
        return {}
    cfg = Path(path).with_name("config.json")
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError):
        return {}
