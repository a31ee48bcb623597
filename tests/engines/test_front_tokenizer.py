"""The server's tokenizer (`LlamaCppEngine.front`, a vocab-only llama.cpp model): each text is
tokenised once, and its ids are those of llama.cpp's own tokenizer."""

from __future__ import annotations

import llama_cpp
import pytest

from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.engines.templates import Part

TEXTS = ["def add(a, b):\n    return a + b\n", "a", " ", "é€😀\x00ab", "x" * 3000, "<|fim_prefix|>x<|fim_suffix|>y"]


@pytest.fixture(scope="module")
def front(tiny_gguf):
    return LlamaCppEngine.front(str(tiny_gguf))


@pytest.mark.parametrize("special", [True, False])
def test_front_ids_are_llama_cpps(front, special):
    for text in TEXTS:
        assert front.encode([Part(text, special)], bos=False) == front._model.tokenize(
            text.encode(), add_bos=False, special=special
        )


def test_a_text_is_tokenised_once(front, monkeypatch):
    """llama-cpp-python sizes its buffer by the training context, which a vocab-only model reports as 0:
    every prompt the server built was tokenised twice (a refused first call, then the real one)."""
    calls = []
    real = llama_cpp.llama_tokenize

    def counted(*a):
        calls.append(a[2])
        return real(*a)

    monkeypatch.setattr(llama_cpp, "llama_tokenize", counted)
    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_tokenize", counted)  # what llama-cpp-python's own wrappers call
    front.encode([Part("def add(a, b):", True)])
    assert len(calls) == 1
