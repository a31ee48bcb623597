"""Parity between the two engines on one micro model: the Hugging Face tokenizer and llama.cpp give
the same token ids, and the transformers and llama.cpp engines give the same next-token logits."""

import asyncio

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from codemoat.engines.base import SamplingParams  # noqa: E402
from codemoat.engines.llamacpp import LlamaCppEngine  # noqa: E402
from codemoat.engines.transformers_engine import TransformersEngine  # noqa: E402
from codemoat.train.micro import build_micro_gguf  # noqa: E402

SAMPLES = [
    "def parse_header(line: str) -> dict[str, int]:\n    return {k: int(v) for k, v in pairs}\n",
    "    \t  mixed\t\twhitespace   runs\n\n\n\r\n   \n",
    "naïve_café = '日本語のテキスト' + \"émoji 🎉🚀\" + 'Ωmega ß ǅ'  # ünïcödé\n",
    "x=1;y=22;z=333;w=4444.5e-10;0xDEADbeef;1_000_000\n",
    "it's they'll we've I'M you'D HE'S\n",
    "<|fim_prefix|>def f(a):\n    <|fim_suffix|>\n    return b<|fim_middle|>",
    "<|repo_name|>acme/app\n<|file_sep|>src/util.py\nimport os\n<|file_sep|>src/main.py\n<|endoftext|><|fim_pad|>",
    "if(a&&b||!c){return a->b[i]<<2;}/* c */ // comment\n#include <stdio.h>\n",
    "",
]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = build_micro_gguf(tmp_path_factory.mktemp("micro"), seed=0, ftype="f32")
    lc = LlamaCppEngine.from_path(path, n_ctx=128, n_threads=1)
    tf = TransformersEngine.from_path(path, n_threads=1)
    yield lc, tf
    lc.close()
    tf.close()


@pytest.mark.parametrize("text", SAMPLES)
def test_token_ids_identical(engines, text):
    lc, tf = engines
    assert tf.tokenize(text) == lc.tokenize(text)
    assert tf.tokenize(text, special=False) == lc.tokenize(text, special=False)


def test_special_tokens_are_control_and_parsed_only_when_asked(engines):
    lc, tf = engines
    for s in (
        "<|endoftext|>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    ):
        assert len(lc.tokenize(s)) == 1 and tf.tokenize(s) == lc.tokenize(s)
        assert lc.has_token(s) and tf.has_token(s)
        assert len(tf.tokenize(s, special=False)) > 1
    # control tokens are never text (the template's, not the answer's); written as text they round-trip
    assert lc.detokenize(lc.tokenize(SAMPLES[6], special=False)) == SAMPLES[6]
    assert "<|fim_prefix|>" not in lc.detokenize(lc.tokenize("<|fim_prefix|>x"))
    assert tf.detokenize(tf.tokenize(SAMPLES[2])) == SAMPLES[2]


@pytest.mark.parametrize("prompt", [SAMPLES[0], SAMPLES[5], SAMPLES[6] + "x = ", "import"])
def test_next_token_logits_agree(engines, prompt):
    lc, tf = engines
    a, b = lc.logits(prompt), tf.logits(prompt)
    assert a.shape == b.shape == (tf.n_vocab,)
    assert np.abs(a - b).max() < 1e-2 * max(1.0, np.abs(b).max())
    assert int(a.argmax()) == int(b.argmax())


def test_logits_differ_for_different_prompts(engines):
    """Guard against a parity test that passes because both sides return constants."""
    lc, tf = engines
    a, b = tf.logits("import os\n"), tf.logits("class Foo:\n    def")
    assert np.abs(a - b).max() > 1e-3
    assert np.abs(lc.logits("import os\n") - b).max() > 1e-3


def test_greedy_generation_agrees(engines):
    lc, tf = engines
    p = SamplingParams(max_tokens=12, temperature=0)
    prompt = "def encode(self, o):\n    "
    a = asyncio.run(lc.complete(prompt, p))
    b = asyncio.run(tf.complete(prompt, p))
    assert a.text == b.text and a.completion_tokens == b.completion_tokens


BUNDLED = __import__("pathlib").Path(__file__).resolve().parents[2] / "models" / "codemoat-tiny.gguf"


@pytest.mark.slow
@pytest.mark.skipif(not BUNDLED.with_suffix(".hf").is_dir(), reason="bundled model not present")
def test_bundled_model_parity():
    lc = LlamaCppEngine.from_path(BUNDLED, n_ctx=512, n_threads=1)
    tf = TransformersEngine.from_path(BUNDLED, n_threads=1)
    try:
        assert tf.metadata["general.name"] == lc.metadata["general.name"] == "codemoat-tiny"
        for text in SAMPLES:
            assert tf.tokenize(text) == lc.tokenize(text)
        prompt = "<|fim_prefix|>import os\n\ndef exists(path):\n<|fim_suffix|>\n<|fim_middle|>"
        a, b = lc.logits(prompt), tf.logits(prompt)
        assert np.abs(a - b).max() < 2e-2 and int(a.argmax()) == int(b.argmax())  # both from F16 weights
    finally:
        lc.close()
        tf.close()
