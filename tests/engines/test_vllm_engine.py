"""The vLLM engine needs a CUDA GPU and vLLM; without them it must fail cleanly, not pretend."""

import importlib.util

import pytest

from codemoat.engines import engine_class
from codemoat.errors import CodemoatError


def test_registered():
    assert engine_class("vllm").name == "vllm"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed: the clean-error path does not apply")
def test_without_vllm_the_error_is_one_clear_line(random_gguf):
    with pytest.raises(CodemoatError, match="needs vLLM and a CUDA GPU"):
        engine_class("vllm").from_path(random_gguf)


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM cannot be installed on this CPU-only machine (needs CUDA torch and flashinfer)",
)
def test_generate_on_gpu(random_gguf):  # pragma: no cover - runs only where vLLM is installed
    import asyncio

    from codemoat.engines.base import SamplingParams

    e = engine_class("vllm").from_path(random_gguf, n_ctx=512)
    out = asyncio.run(e.complete("def add(", SamplingParams(max_tokens=8, temperature=0)))
    assert out.completion_tokens >= 1
    e.close()


def test_unknown_engine():
    with pytest.raises(CodemoatError, match="unknown engine"):
        engine_class("tensorrt")
