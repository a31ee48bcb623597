"""Undo function-preserving permutations of a suspect before comparing it with the original.

A transformer computes the same function when the hidden units of an MLP are reordered (rows of
W_gate and W_up and columns of W_down by one permutation π), and when the attention heads of a
layer are reordered (rows of W_q, W_k, W_v and columns of W_o, head by head, keeping each query
head with its key/value group). A leaker can apply such a π to scramble a fingerprint. We recover
π by weight matching (Ainsworth, Hayase, Srinivasa 2023, "Git Re-Basin", §3.2): unit j of the
suspect is matched to the original unit whose weight vector (all the weights that move with it)
has the highest cosine similarity. The fingerprint and any later noise are small next to the
weights, so the match is exact in practice; a unit already in place costs one dot product.
"""

from __future__ import annotations

import re

import numpy as np

# (rows that move with a hidden unit, columns that move with it) per naming scheme
_MLP = (
    (re.compile(r"^blk\.(\d+)\.ffn_up\.weight$"), "blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight", "blk.{i}.ffn_down.weight"),
    (
        re.compile(r"^model\.layers\.(\d+)\.mlp\.up_proj\.weight$"),
        "model.layers.{i}.mlp.gate_proj.weight",
        "model.layers.{i}.mlp.up_proj.weight",
        "model.layers.{i}.mlp.down_proj.weight",
    ),
)
_ATTN = (
    ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight", "blk.{i}.attn_output.weight"),
    (
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
        "model.layers.{i}.self_attn.o_proj.weight",
    ),
)


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1; a row holding NaN or Inf (a hostile suspect's) is all zeros: it matches nothing
    well, and numpy prints no RuntimeWarning on the vendor's terminal."""
    with np.errstate(invalid="ignore", over="ignore"):
        u = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
    return np.where(np.isfinite(u), u, 0).astype(u.dtype, copy=False)


def match(feat_s: np.ndarray, feat_o: np.ndarray) -> np.ndarray:
    """π with suspect unit π[j] ↔ original unit j, from features (n_units, d) of each side."""
    fs, fo = _unit(feat_s.astype(np.float32)), _unit(feat_o.astype(np.float32))
    n = len(fo)
    if np.all(np.einsum("ij,ij->i", fs, fo) > 0.5):
        return np.arange(n)  # already in place
    sim = fo @ fs.T  # (original, suspect)
    best = sim.argmax(axis=1)
    if len(np.unique(best)) == n:
        return best
    # ties or collisions: greedy assignment, highest similarity first
    perm = np.full(n, -1)
    taken = np.zeros(n, bool)
    for k in np.argsort(-sim, axis=None):
        j, s = divmod(int(k), n)
        if perm[j] < 0 and not taken[s]:
            perm[j], taken[s] = s, True
    return perm


def _in_place(pairs: list[tuple[np.ndarray, np.ndarray]]) -> bool:
    """match()'s first test, cos(suspect unit j, original unit j) > 0.5 for every j, summed over the
    tensors that move with the units instead of on their concatenation (no copy of a layer)."""
    with np.errstate(invalid="ignore", over="ignore"):  # NaN or Inf in a hostile suspect: not in place (NaN > x is False)
        dot = sum(np.einsum("ij,ij->i", a, b, dtype=np.float64) for a, b in pairs)
        na = sum(np.einsum("ij,ij->i", a, a, dtype=np.float64) for a, _ in pairs)
        nb = sum(np.einsum("ij,ij->i", b, b, dtype=np.float64) for _, b in pairs)
        return bool(np.all(dot > 0.5 * np.sqrt(na * nb) + 1e-30))


def _heads(w: np.ndarray, n: int) -> np.ndarray:
    """Rows of a projection grouped by head: (n, rows_per_head·n_in)."""
    return w.reshape(n, -1)


def _align_attention(s: dict, o: dict, names: tuple[str, ...], n_head: int, n_kv: int) -> int:
    q, k, v, out = names
    if not all(x in s and x in o for x in names) or s[q].shape != o[q].shape or n_head % n_kv:
        return 0
    g = n_head // n_kv  # query heads per key/value head
    hd = o[q].shape[0] // n_head

    def feats(d: dict) -> tuple[np.ndarray, np.ndarray]:
        qh = d[q].reshape(n_head, hd * d[q].shape[1])
        oh = d[out].reshape(d[out].shape[0], n_head, hd).transpose(1, 0, 2).reshape(n_head, -1)
        per_q = np.concatenate([qh, oh], axis=1)  # (n_head, …)
        per_kv = np.concatenate([_heads(d[k], n_kv), _heads(d[v], n_kv), per_q.reshape(n_kv, -1)], axis=1)
        return per_q, per_kv

    sq, skv = feats(s)
    oq, okv = feats(o)
    pkv = match(skv, okv)  # suspect group pkv[j] ↔ original group j
    perm_q = np.concatenate([pkv[j] * g + match(sq[pkv[j] * g : pkv[j] * g + g], oq[j * g : j * g + g]) for j in range(n_kv)])
    if np.array_equal(pkv, np.arange(n_kv)) and np.array_equal(perm_q, np.arange(n_head)):
        return 0
    s[q] = s[q].reshape(n_head, hd, -1)[perm_q].reshape(s[q].shape)
    s[k] = s[k].reshape(n_kv, -1, s[k].shape[1])[pkv].reshape(s[k].shape)
    s[v] = s[v].reshape(n_kv, -1, s[v].shape[1])[pkv].reshape(s[v].shape)
    s[out] = s[out].reshape(s[out].shape[0], n_head, hd)[:, perm_q].reshape(s[out].shape)
    return int(np.sum(perm_q != np.arange(n_head)))


def align(suspect: dict[str, np.ndarray], original: dict[str, np.ndarray], meta: dict | None = None) -> dict[str, int]:
    """Reorder `suspect`'s MLP hidden units and attention heads in place to match `original`.

    Returns how many units moved, per tensor group. `meta` (GGUF metadata or a transformers
    config as a dict) gives the head counts; without them heads are left as they are.
    """
    moved: dict[str, int] = {}
    for name in list(original):
        for pat, gate, up, down in _MLP:
            m = pat.match(name)
            if not m:
                continue
            i = m.group(1)
            g, u, d = gate.format(i=i), up.format(i=i), down.format(i=i)
            rows = [x for x in (g, u) if x in original and x in suspect and suspect[x].shape == original[x].shape]
            cols = [d] if d in original and d in suspect and suspect[d].shape == original[d].shape else []
            if not rows and not cols:
                continue
            pairs = [(suspect[x], original[x]) for x in rows] + [(suspect[x].T, original[x].T) for x in cols]
            if _in_place(pairs):
                continue  # every unit already where it was: nothing to build or match
            fs = np.concatenate([suspect[x] for x in rows] + [suspect[x].T for x in cols], axis=1)
            fo = np.concatenate([original[x] for x in rows] + [original[x].T for x in cols], axis=1)
            perm = match(fs, fo)
            n = int(np.sum(perm != np.arange(len(perm))))
            if n:
                for x in rows:
                    suspect[x] = suspect[x][perm]
                for x in cols:
                    suspect[x] = suspect[x][:, perm]
                moved[f"mlp.{i}"] = n
    n_head, n_kv = _head_counts(meta or {})
    if n_head:
        layers = sorted({int(m.group(1)) for n in original if (m := re.match(r"^(?:blk|model\.layers)\.(\d+)\.", n))})
        for i in layers:
            for names in _ATTN:
                n = _align_attention(suspect, original, tuple(x.format(i=i) for x in names), n_head, n_kv)
                if n:
                    moved[f"attn.{i}"] = n
    return moved


def _head_counts(meta: dict) -> tuple[int, int]:
    arch = meta.get("general.architecture")
    n_head = meta.get(f"{arch}.attention.head_count") or meta.get("num_attention_heads") or 0
    n_kv = meta.get(f"{arch}.attention.head_count_kv") or meta.get("num_key_value_heads") or n_head
    if isinstance(n_head, (list, tuple)) or isinstance(n_kv, (list, tuple)):
        return 0, 0  # per-layer head counts: leave heads alone
    return int(n_head), int(n_kv)
