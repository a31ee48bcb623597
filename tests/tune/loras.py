"""A random LoRA adapter for a GGUF model, written with the `gguf` package (no torch): strong enough
that greedy completions with and without it differ."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def random_lora_gguf(base: Path, rank: int = 4, scale: float = 0.3, seed: int = 0) -> bytes:
    import gguf

    rng = np.random.default_rng(seed)
    reader = gguf.GGUFReader(str(base))
    fd = os.memfd_create("lora")
    try:
        w = gguf.GGUFWriter(f"/proc/self/fd/{fd}", "llama")
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(rank))
        for t in reader.tensors:
            if t.name.endswith(("attn_q.weight", "attn_v.weight", "ffn_up.weight")):
                n_in, n_out = int(t.shape[0]), int(t.shape[1])  # ne order: columns first
                w.add_tensor(t.name + ".lora_a", (rng.standard_normal((rank, n_in)) * scale).astype(np.float32))
                w.add_tensor(t.name + ".lora_b", (rng.standard_normal((n_out, rank)) * scale).astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)


def sealed_adapter(base: Path, out: Path, name: str, repos: list[tuple[str, list[str]]], seed: int = 0) -> Path:
    from codemoat.engines.adapters import Adapter, file_sha256, seal_adapter

    meta = {
        "name": name,
        "kind": "codemoat-adapter",
        "version": 1,
        "base": {"name": base.stem, "sha256": file_sha256(base)},
        "repos": [{"name": r, "groups": g} for r, g in repos],
    }
    return seal_adapter(Adapter(meta, random_lora_gguf(base, seed=seed), b"", "{}"), out)
