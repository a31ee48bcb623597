"""`trace` of two GGUF files, tensor by tensor: memory stays at one transformer layer.

The statistics are detect.py's: per tensor t and customer c a normalised correlation z_t, combined
by Stouffer's weighted sum Z_c = Σ a_t z_t / √(Σ a_t²), p ≤ exp(-Z²/2) (Hoeffding), Bonferroni
over customers. What streaming changes is only the order of work: the layers of both files are
read one at a time (a layer's matrices are needed together to undo permutations, align.py), each
scored against every customer, and dropped. Tensors outside the layers (the embedding, the
output matrix) are never permuted; only the rows that are scored are read from them.

Dense-marked tensors (float originals): rows from the top, in proportion to each tensor's size,
up to `max_positions` weights, as detect.residuals. Sparse-marked tensors (quantised originals,
fingerprint.py): the residual at customer c's positions P_c, in units of the original's step,

    r_k = (S_k - W_k) / |step_k|,   z_t = Σ_k r_k b_k / ||r||,   a_t = √|P_c| / rms(r)

(a clean mark gives r = b, z_t = √|P_c|). P_c and b are independent keyed streams, so for any
customer whose mark the suspect does not carry, z_t is a normalised Rademacher sum as before.
Up to `max_sparse` positions per customer are scored (segments from the top of each tensor).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import CodemoatError
from . import fingerprint as fp
from .align import align
from .detect import MAX_POSITIONS, THRESHOLD, TraceResult, load, ranked, robust, trace
from .gguf_stream import GGUFFile, TensorInfo

MAX_SPARSE = 1_000_000
_LAYER = re.compile(r"^(?:blk|model\.layers)\.(\d+)\.")


def trace_gguf(
    suspect: Path,
    original: Path,
    customers: Mapping[str, bytes],
    alpha: float = fp.ALPHA,
    threshold: float = THRESHOLD,
    max_positions: int = MAX_POSITIONS,
    max_sparse: int = MAX_SPARSE,
) -> TraceResult:
    """Rank `customers` by the evidence that the GGUF `suspect` carries their mark (original: `original`)."""
    with GGUFFile(suspect) as S, GGUFFile(original) as O:
        plan = []
        for t in O.tensors:
            how = fp.marks(t.name, t.kind, t.shape)
            st = S.by_name.get(t.name)
            if how and st is not None and st.shape == t.shape:
                plan.append((t, how))
        if not plan:
            raise CodemoatError("the suspect shares no weight matrix with the original (another architecture?)")
        dense = sum(t.size for t, how in plan if how == "dense")
        share_d = min(1.0, max_positions / dense) if dense else 1.0
        sparse = sum(math.ceil(t.size / fp.segment_size(t.size)) for t, how in plan if how == "sparse") * fp.PER_SEGMENT
        share_s = min(1.0, max_sparse / sparse) if sparse else 1.0
        acc = {c: [0.0, 0.0] for c in customers}  # Σ a·z, Σ a²
        stats = {"positions": 0, "tensors": 0}
        realigned: dict[str, int] = {}
        groups: dict[str, list] = {}
        for t, how in plan:
            m = _LAYER.match(t.name)
            groups.setdefault(m.group(1) if m else t.name, []).append((t, how))
        for group in groups.values():
            if _LAYER.match(group[0][0].name):  # a layer: whole matrices, re-aligned
                s = {t.name: S.matrix(S.by_name[t.name]) for t, _ in group}
                o = {t.name: O.matrix(t) for t, _ in group}
                realigned.update(align(s, o, O.metadata))
                for t, how in group:
                    rows = _rows(t, how, share_d, share_s)
                    _score(
                        O,
                        t,
                        how,
                        fp.as_matrix(s.pop(t.name))[:rows],
                        fp.as_matrix(o.pop(t.name))[:rows],
                        customers,
                        acc,
                        stats,
                        alpha,
                        share_s,
                    )
            else:  # never permuted: the scored rows only
                for t, how in group:
                    rows = _rows(t, how, share_d, share_s)
                    if how == "dense":
                        _score(
                            O,
                            t,
                            how,
                            S.rows(S.by_name[t.name], 0, rows),
                            O.rows(t, 0, rows),
                            customers,
                            acc,
                            stats,
                            alpha,
                            share_s,
                        )
                        continue
                    part: dict = {}
                    for r0, r1 in O.row_blocks(t, 64 << 20):
                        if r0 >= rows:
                            break
                        r1 = min(r1, rows)
                        _sparse(O, t, S.rows(S.by_name[t.name], r0, r1), O.rows(t, r0, r1), r0, customers, part, share_s)
                    _finish(part, acc, stats)
    zs = {cname: num / math.sqrt(den) if den > 0 else 0.0 for cname, (num, den) in acc.items()}
    return ranked(zs, threshold, positions=stats["positions"], tensors=stats["tensors"], realigned=realigned)


def _segments(t: TensorInfo, share_s: float) -> int:
    return max(1, math.ceil(math.ceil(t.size / fp.segment_size(t.size)) * share_s))


def _rows(t: TensorInfo, how: str, share_d: float, share_s: float) -> int:
    """How many rows from the top of `t` are scored."""
    if how == "dense":
        return max(1, min(t.rows, int(t.rows * share_d)))
    return min(t.rows, math.ceil(min(t.size, _segments(t, share_s) * fp.segment_size(t.size)) / t.cols))


def _score(
    O: GGUFFile,
    t: TensorInfo,
    how: str,
    s: np.ndarray,
    w: np.ndarray,
    customers: Mapping[str, bytes],
    acc: dict,
    stats: dict,
    alpha: float,
    share_s: float,
) -> None:
    """Add tensor t's evidence (suspect rows s, original rows w, float32 (rows, cols)) to every customer."""
    if how == "dense":
        sigma = fp.row_scale(w)
        r = robust(np.where(sigma > 0, (s - w) / np.where(sigma > 0, sigma, 1), 0).astype(np.float32))
        norm = float(np.linalg.norm(r))
        if norm == 0 or not np.isfinite(norm):
            return  # unchanged tensor: no evidence either way
        a = math.sqrt(r.size) * alpha / (norm / math.sqrt(r.size))
        flat = r.ravel()
        for cname, secret in customers.items():
            b = fp.pattern(secret, t.name, r.shape[1], 0, r.shape[0]).ravel()
            z = float(np.dot(flat, b)) / norm
            acc[cname][0] += a * z
            acc[cname][1] += a * a
        stats["positions"] += r.size
        stats["tensors"] += 1
        return
    part: dict = {}
    _sparse(O, t, s, w, 0, customers, part, share_s)
    _finish(part, acc, stats)


def _sparse(
    O: GGUFFile,
    t: TensorInfo,
    s: np.ndarray,
    w: np.ndarray,
    row0: int,
    customers: Mapping[str, bytes],
    part: dict,
    share_s: float,
) -> None:
    """Σ r·b, Σ r², |P| of every customer over rows row0.. of a sparse-marked tensor, added to `part`."""
    from . import quant

    resid = (s - w).ravel()
    if not np.any(resid):
        return
    lo = row0 * t.cols
    seg = fp.segment_size(t.size)
    hi = min(t.size, _segments(t, share_s) * seg, lo + resid.size)
    blocks = O.raw_rows(t, row0, row0 + s.shape[0]).reshape(-1, t.block_bytes)
    for cname, secret in customers.items():
        pos, sign = fp.selection(secret, t.name, hi, lo // seg, -(-hi // seg), t.size)
        inside = pos >= lo
        pos, sign = pos[inside] - lo, sign[inside]
        if not len(pos):
            continue
        _, step = quant.codes_at(blocks, t.kind, pos // t.block, pos % t.block)
        mag = np.abs(step)
        r = robust(np.where(mag > 0, resid[pos] / np.where(mag > 0, mag, 1), 0).astype(np.float64))
        got = part.setdefault(cname, [0.0, 0.0, 0])
        got[0] += float(np.dot(r, sign))
        got[1] += float(np.dot(r, r))
        got[2] += len(r)


def _finish(part: dict, acc: dict, stats: dict) -> None:
    """z_t = Σ r·b / ||r|| and a_t = |P| / ||r|| (= √|P| / rms r) of one sparse tensor, per customer."""
    used = 0
    for cname, (rb, rr, k) in part.items():
        if rr == 0 or not math.isfinite(rr):
            continue
        norm = math.sqrt(rr)
        a = k / norm
        acc[cname][0] += a * rb / norm
        acc[cname][1] += a * a
        used = max(used, k)
    if used:
        stats["positions"] += used
        stats["tensors"] += 1


def trace_files(suspect_path, original_path, customers: Mapping[str, bytes], **kw) -> TraceResult:
    """`trace` on two model files (GGUF of any quantisation, or safetensors); two GGUF files are
    streamed tensor by tensor (`trace_gguf`); others are loaded whole (`detect.trace`). Here rather
    than in detect.py, so that the two modules import one way (this one imports detect)."""
    from . import gguf_io
    from .vendor_io import weights_path

    sp, op = weights_path(suspect_path), weights_path(original_path)
    if gguf_io.is_gguf(sp) and gguf_io.is_gguf(op):
        if not customers:
            raise CodemoatError("no customers registered: nothing to trace against")
        return trace_gguf(sp, op, customers, **kw)
    s, _, _ = load(sp)
    o, meta, names = load(op)
    return trace(s, o, customers, names=names, meta=meta, **kw)
