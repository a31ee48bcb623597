"""Fixtures: tiny random llama GGUFs (built once per session) and fingerprint secrets."""

from __future__ import annotations

import hashlib

import pytest

from .synth import Shape, corpus, tiny_model, train_bpe


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe(320, corpus(20))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("trace-models")


@pytest.fixture(scope="session")
def f16_model(model_dir, tokenizer):
    """A 2-layer llama GGUF with F16 matrices (seed 0)."""
    return tiny_model(model_dir / "orig-f16.gguf", seed=0, dtype="F16", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def unrelated_model(model_dir, tokenizer):
    """Same architecture, other weights (seed 1)."""
    return tiny_model(model_dir / "other-f16.gguf", seed=1, dtype="F16", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def flat_model(model_dir, tokenizer):
    """A model with high next-token entropy everywhere, for watermark tests."""
    return tiny_model(model_dir / "flat.gguf", seed=2, dtype="F32", tokenizer=tokenizer, shape=Shape(out_std=0.05))


@pytest.fixture(scope="session")
def secrets() -> dict[str, bytes]:
    """20 customers with fixed, distinct 32-byte secrets."""
    return {f"cust{i:02d}": hashlib.sha256(b"test-fingerprint-%d" % i).digest() for i in range(20)}
