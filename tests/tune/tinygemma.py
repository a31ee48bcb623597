"""A tiny Gemma-3-architecture GGUF with random weights (F32), as llama.cpp's converter lays one out:
q/k norms, post-attention and post-feed-forward norms, the output tied to the token embedding, no
q/k row permutation, norm weights stored as 1 + w. head_dim is 256 as in every Gemma 3 (transformers
scales queries by `query_pre_attn_scalar` = 256, llama.cpp by head_dim: they agree only there).
The writer is tests/tinymodel.py's, with its "gemma3" layout."""

from __future__ import annotations

from pathlib import Path

from tests.tinymodel import build_tiny_gguf


def build_tiny_gemma3(path: Path, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, n_kv: int = 1, seed: int = 0) -> Path:
    return build_tiny_gguf(path, arch="gemma3", n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_kv=n_kv, seed=seed)
