"""What a leaker might do to a copy before passing it on; each writes a new GGUF (tests and bench)."""

from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from codemoat.trace import gguf_io


def transform(src: Path, dst: Path, fn: Callable[[dict[str, np.ndarray], dict], None]) -> Path:
    """Copy `src` to `dst`, letting `fn(matrices, metadata)` change the matrices in place (types kept)."""
    data = Path(src).read_bytes()
    with gguf_io.open_gguf(data, writable=True) as r:
        meta = gguf_io.metadata(r)
        mats = {t.name: gguf_io.dequantize(t) for t in r.tensors if len(t.shape) >= 2}
        before = {k: v.copy() for k, v in mats.items()}
        fn(mats, meta)
        for t in r.tensors:
            if t.name in mats and not np.array_equal(mats[t.name], before[t.name]):
                gguf_io.write_tensor(t, mats[t.name])
        Path(dst).write_bytes(bytes(r.data))
    return Path(dst)


def requantize(src: Path, dst: Path, ftype: int) -> Path:
    """llama.cpp's own quantiser (ftype 7 = Q8_0, 15 = Q4_K_M), as a leaker would run it."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    with _quiet():  # the quantiser prints a line per tensor from C
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return Path(dst)


@contextmanager
def _quiet():
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def noise(rel: float, seed: int = 0):
    """Gaussian noise of `rel` times each tensor's RMS on every matrix."""

    def fn(m: dict, meta: dict) -> None:
        rng = np.random.default_rng(seed)
        for k, w in m.items():
            m[k] = w + rel * float(np.sqrt(np.mean(w**2))) * rng.standard_normal(w.shape).astype(np.float32)

    return fn


def prune(frac: float):
    """Magnitude pruning: zero the `frac` smallest weights of every matrix."""

    def fn(m: dict, meta: dict) -> None:
        for k, w in m.items():
            t = np.quantile(np.abs(w), frac)
            m[k] = np.where(np.abs(w) < t, 0.0, w).astype(np.float32)

    return fn


def permute(seed: int = 0):
    """Reorder MLP hidden units and attention heads of every layer (the function is unchanged)."""

    def fn(m: dict, meta: dict) -> None:
        rng = np.random.default_rng(seed)
        arch = meta["general.architecture"]
        n_head, n_kv = int(meta[f"{arch}.attention.head_count"]), int(meta[f"{arch}.attention.head_count_kv"])
        layers = sorted({int(x.group(1)) for k in m if (x := re.match(r"blk\.(\d+)\.", k))})
        for i in layers:
            p = f"blk.{i}."
            pi = rng.permutation(m[p + "ffn_up.weight"].shape[0])
            m[p + "ffn_up.weight"] = m[p + "ffn_up.weight"][pi]
            m[p + "ffn_gate.weight"] = m[p + "ffn_gate.weight"][pi]
            m[p + "ffn_down.weight"] = m[p + "ffn_down.weight"][:, pi]
            g = n_head // n_kv
            pkv = rng.permutation(n_kv)
            pq = np.concatenate([j * g + rng.permutation(g) for j in pkv])
            hd = m[p + "attn_q.weight"].shape[0] // n_head
            q, k, v, o = (m[p + x] for x in ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight"))
            m[p + "attn_q.weight"] = q.reshape(n_head, hd, -1)[pq].reshape(q.shape)
            m[p + "attn_k.weight"] = k.reshape(n_kv, hd, -1)[pkv].reshape(k.shape)
            m[p + "attn_v.weight"] = v.reshape(n_kv, hd, -1)[pkv].reshape(v.shape)
            m[p + "attn_output.weight"] = o.reshape(o.shape[0], n_head, hd)[:, pq].reshape(o.shape)

    return fn


def average(other: Path):
    """The mean of this copy and `other` (two customers colluding)."""

    def fn(m: dict, meta: dict) -> None:
        o, _ = gguf_io.read_matrices(other)
        for k in m:
            m[k] = (m[k] + o[k]) / 2

    return fn


def copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return Path(dst)
