"""Adapters folded into an in-memory copy of the base (`engines.merge`, `model.fold_adapters`): the
folded copy computes what llama.cpp computes with the adapter applied at run time, the engine routes
an adapter's requests to its folded copy and everyone else's to the base, and what cannot be folded
faithfully (low-bit quantised weights, tensors the base lacks) is left to llama.cpp or refused."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from codemoat.engines.base import SamplingParams
from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.errors import CodemoatError
from tests.tune.loras import forcing_lora_gguf, random_lora_gguf

PROMPT = "def interchange_fee(amount_cents: int) -> int:\n    return"


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory) -> Path:
    from tinymodel import build_tiny_gguf

    return build_tiny_gguf(tmp_path_factory.mktemp("fold") / "tiny.gguf", n_embd=64, seed=5)


def memfd_path(data: bytes) -> str:
    fd = os.memfd_create("lora")
    os.write(fd, data)
    return f"/proc/self/fd/{fd}"


def logits(path: str, lora: str | None = None) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(path, lora_path=lora, n_ctx=128, logits_all=True, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)])
    llm.close()
    return out


def test_folded_copy_computes_what_the_runtime_adapter_computes(f32_gguf):
    from codemoat.engines.merge import fold

    lora = memfd_path(random_lora_gguf(f32_gguf, seed=2))
    buf = fold(str(f32_gguf), lora)
    try:
        assert buf.path.startswith("/proc/self/fd/") and buf.sealed  # in memory only, and frozen
        base, runtime, folded = logits(str(f32_gguf)), logits(str(f32_gguf), lora), logits(buf.path)
        effect = np.abs(runtime - base).max()
        assert effect > 0.5
        assert np.abs(folded - runtime).max() < 1e-3 * effect  # F32: only summation order differs
    finally:
        buf.close()


def test_engine_serves_folded_adapters_and_the_base_beside_them(f32_gguf):
    paths = {"rnd": memfd_path(random_lora_gguf(f32_gguf, seed=2)), "fox": memfd_path(forcing_lora_gguf(f32_gguf, "Ġfox"))}

    def answers(eng) -> dict:
        return {
            a: asyncio.run(eng.complete(PROMPT, SamplingParams(max_tokens=12, temperature=0, adapter=a))).text
            for a in (None, *paths)
        }

    runtime = LlamaCppEngine(str(f32_gguf), n_ctx=256, n_threads=1, parallel=2, adapters=paths)
    folded = LlamaCppEngine(str(f32_gguf), n_ctx=256, n_threads=1, parallel=2, adapters=paths, fold_adapters=True)
    try:
        want = answers(runtime)
        assert sorted(folded._folded) == ["fox", "rnd"] and not folded._loras  # nothing left for llama.cpp to apply
        assert want["fox"] == " fox" * 12 and len(set(want.values())) == 3
        assert answers(folded) == want

        async def together():  # all three at once: each to its own engine
            jobs = [(a, SamplingParams(max_tokens=12, temperature=0, adapter=a)) for a in (None, "rnd", "fox") * 2]
            return [(a, c.text) for (a, _), c in zip(jobs, await asyncio.gather(*(folded.complete(PROMPT, p) for _, p in jobs)))]

        assert all(text == want[a] for a, text in asyncio.run(together()))
    finally:
        runtime.close()
        folded.close()
    # a low-bit base keeps llama.cpp's run-time adapter (requantising would blur the adapter's change)
    from tinymodel import quantise

    low = quantise(f32_gguf, f32_gguf.with_name("tiny-q4_0.gguf"), "Q4_0")
    eng = LlamaCppEngine(str(low), n_ctx=256, n_threads=1, parallel=2, adapters=paths, fold_adapters=True)
    try:
        assert not eng._folded and sorted(eng._loras) == ["fox", "rnd"]
        assert asyncio.run(eng.complete(PROMPT, SamplingParams(max_tokens=12, temperature=0, adapter="fox"))).text == " fox" * 12
    finally:
        eng.close()


def test_what_cannot_be_folded_is_said_in_one_line(f32_gguf, tmp_path):
    from codemoat.engines.merge import fold, foldable
    from tinymodel import build_tiny_gguf, quantise

    other = build_tiny_gguf(tmp_path / "wide.gguf", n_embd=128, n_layer=3)
    lora = memfd_path(random_lora_gguf(other, seed=1))  # blk.2 and wider matrices: not this base's
    assert "has no tensor blk.2" in (foldable(str(f32_gguf), lora) or "")
    with pytest.raises(CodemoatError, match="does not have|has shape"):
        fold(str(f32_gguf), lora)
    low = quantise(f32_gguf, tmp_path / "q4.gguf", "Q4_0")
    assert "is Q4_0" in (foldable(str(low), memfd_path(random_lora_gguf(f32_gguf))) or "")
