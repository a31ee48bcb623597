"""The transformers engine on a micro model: loading from bytes, sampling options, stops, processors, cancellation."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from codemoat.engines import engine_class  # noqa: E402
from codemoat.engines.base import PromptTooLong, SamplingParams  # noqa: E402
from codemoat.engines.transformers_engine import TransformersEngine, sample_token  # noqa: E402
from codemoat.errors import CodemoatError  # noqa: E402
from codemoat.train.micro import build_micro_gguf  # noqa: E402
from enginehelp import run  # noqa: E402

PROMPT = "def decode(self, s):\n    "


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_micro_gguf(tmp_path_factory.mktemp("micro"), seed=0).with_suffix(".hf")


@pytest.fixture(scope="module")
def eng(hf_dir):
    e = TransformersEngine.from_dir(hf_dir, n_threads=1)
    yield e
    e.close()


def test_registry_and_from_bytes(hf_dir, eng):
    assert engine_class("transformers") is TransformersEngine
    e2 = TransformersEngine.from_bytes(
        (hf_dir / "model.safetensors").read_bytes(),
        json.loads((hf_dir / "config.json").read_text()),
        (hf_dir / "tokenizer.json").read_text(),
        model_id="m",
    )
    try:
        np.testing.assert_array_equal(e2.logits(PROMPT), eng.logits(PROMPT))
        assert e2.n_ctx == 128 and e2.model_id == "m"
    finally:
        e2.close()


def test_metadata_for_template_detection(eng):
    assert eng.has_token("<|fim_prefix|>") and not eng.has_token("<|im_start|>")
    assert eng.token_text("eos") == "<|endoftext|>"
    assert "tokenizer.chat_template" in eng.metadata and eng.metadata["general.architecture"] == "llama"


def test_bad_inputs_are_user_errors(tmp_path, hf_dir):
    with pytest.raises(CodemoatError, match="not a model folder"):
        TransformersEngine.from_dir(tmp_path)
    with pytest.raises(CodemoatError, match="safetensors folder"):
        TransformersEngine.from_path(tmp_path / "x.gguf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["num_hidden_layers"] += 1  # weights for 2 layers, config says 3
    with pytest.raises(CodemoatError, match="do not match"):
        TransformersEngine.from_bytes((hf_dir / "model.safetensors").read_bytes(), cfg, (hf_dir / "tokenizer.json").read_text())
    with pytest.raises(CodemoatError, match="cannot load transformers model"):  # one line, not a SafetensorError
        TransformersEngine.from_bytes(
            b"not safetensors", json.loads((hf_dir / "config.json").read_text()), (hf_dir / "tokenizer.json").read_text()
        )
    # a hostile header (more JSON values than any model's) is refused by codemoat's check before it is decoded:
    # safetensors.torch.load built ~25 Python objects per value of it first (2.7 GB for a 100 MB header)
    from codemoat.trace import st_io

    head = b'{"a":[' + b"{}," * (st_io.MAX_VALUES // 2) + b"{}]}"
    hostile = len(head).to_bytes(8, "little") + head
    with pytest.raises(CodemoatError, match="cannot load transformers model: not a safetensors file: header holds more"):
        TransformersEngine.from_bytes(
            hostile, json.loads((hf_dir / "config.json").read_text()), (hf_dir / "tokenizer.json").read_text()
        )


def test_greedy_is_deterministic_and_bounded(eng):
    p = SamplingParams(max_tokens=10, temperature=0)
    a, b = run(eng.complete(PROMPT, p)), run(eng.complete(PROMPT, p))
    assert a.text == b.text and a.prompt_tokens == len(eng.tokenize(PROMPT))
    assert a.completion_tokens <= 10 and a.finish_reason in ("length", "stop")


def test_seed_reproduces_sampling(eng):
    p = lambda s: SamplingParams(max_tokens=16, temperature=1.5, top_p=1.0, top_k=0, seed=s)  # noqa: E731
    a, b = run(eng.complete(PROMPT, p(7))), run(eng.complete(PROMPT, p(7)))
    assert a.text == b.text
    outs = {run(eng.complete(PROMPT, p(s))).text for s in range(6)}
    assert len(outs) > 1


def test_logits_processor_bans_tokens(eng):
    banned = int(eng.logits(PROMPT).argmax())

    def ban(ids, logits):
        logits = logits.copy()
        logits[banned] = -np.inf
        return logits

    seen = []

    def record(ids, logits):
        seen.append(len(ids))
        return logits

    async def first_ids(procs):
        ids = []
        async for c in eng.stream(PROMPT, SamplingParams(max_tokens=6, temperature=0, logits_processors=procs)):
            ids += c.token_ids
        return ids

    assert run(first_ids([]))[0] == banned
    assert run(first_ids([ban, record]))[0] != banned
    assert seen and seen[0] == len(eng.tokenize(PROMPT)) and seen == sorted(seen)


def test_stop_strings_cut_output(eng):
    free = run(eng.complete(PROMPT, SamplingParams(max_tokens=24, temperature=0))).text
    assert len(free) > 2
    stop = free[1:3]
    cut = run(eng.complete(PROMPT, SamplingParams(max_tokens=24, temperature=0, stop=[stop])))
    assert cut.text == free[: free.index(stop)] and cut.finish_reason == "stop"


def test_stream_chunks_join_to_completion_and_cancel(eng):
    p = SamplingParams(max_tokens=20, temperature=0)

    async def collect():
        return [c async for c in eng.stream(PROMPT, p)]

    chunks = run(collect())
    assert chunks[-1].finish_reason is not None
    assert "".join(c.text for c in chunks) == run(eng.complete(PROMPT, p)).text

    async def cancel_early():
        agen = eng.stream(PROMPT, SamplingParams(max_tokens=100, temperature=0))
        first = await agen.__anext__()
        await agen.aclose()
        return first

    run(cancel_early())
    # the worker is free again: a new request completes
    assert run(eng.complete(PROMPT, SamplingParams(max_tokens=3, temperature=0))).completion_tokens <= 3


def test_prompt_too_long(eng):
    with pytest.raises(PromptTooLong):
        run(eng.complete("x = 1\n" * 200, SamplingParams(max_tokens=8)))


def test_sample_token_top_k_top_p():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 5.0, 4.9, -3.0], dtype=np.float32)
    assert sample_token(logits, SamplingParams(temperature=0), rng) == 1
    picks = {sample_token(logits, SamplingParams(temperature=1.0, top_k=2, top_p=1.0), rng) for _ in range(200)}
    assert picks == {1, 2}
    picks = {sample_token(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.3), rng) for _ in range(100)}
    assert picks == {1}


def test_close_zeroes_weights(hf_dir):
    e = TransformersEngine.from_dir(hf_dir)
    params = list(e._model.parameters())
    e.close()
    assert all(float(p.detach().abs().sum()) == 0.0 for p in params)
    with pytest.raises(CodemoatError):
        e.logits(PROMPT)


def test_empty_prompt_is_refused_like_llamacpp(eng):
    """Zero tokens is the same user error on every engine (it used to start from an invented EOS here)."""
    p = SamplingParams(max_tokens=3, temperature=0)
    assert eng.tokenize("") == []
    for attempt in (lambda: run(eng.complete("", p)), lambda: eng.logits("")):
        with pytest.raises(CodemoatError, match="the prompt is empty"):
            attempt()
    assert run(eng.complete(PROMPT, p)).completion_tokens == 3  # still serving


class _Force:
    def __init__(self, *tokens):
        self.tokens, self.step = list(tokens), 0

    def __call__(self, ids, logits):
        if self.step < len(self.tokens):
            logits = np.full_like(logits, -1e9)
            logits[self.tokens[self.step]] = 0.0
        self.step += 1
        return logits


def test_generated_special_tokens_are_not_text(eng):
    """`<|fim_middle|>` never reaches an answer; a special token that a stop string names ends it."""
    mid = eng.tokenize("<|fim_middle|>")[0]
    word = eng.tokenize("return", special=False)[0]
    out = run(eng.complete(PROMPT, SamplingParams(max_tokens=3, temperature=0, logits_processors=[_Force(word, mid, word)])))
    assert "<|fim_middle|>" not in out.text and out.completion_tokens == 3
    out = run(
        eng.complete(
            PROMPT,
            SamplingParams(
                max_tokens=5,
                temperature=0,
                stop=["<|file_sep|>"],
                logits_processors=[_Force(word, eng.tokenize("<|file_sep|>")[0], word)],
            ),
        )
    )
    assert out.finish_reason == "stop" and out.completion_tokens == 1
