"""Output watermark: its own generations are detected, human code and other keys are not."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from codemoat.trace import watermark as wm

KEY, OTHER = bytes(range(32)), bytes(range(1, 33))


@pytest.fixture(scope="module")
def scorer(flat_model):
    return wm.LlamaScorer(str(flat_model), n_ctx=256)


def _generate(model: Path, procs, n: int = 200, seed: int = 0, prompt: str = "def main(") -> str:
    from llama_cpp import LogitsProcessorList

    def no_eos(ids, logits):  # a random model would stop early; (llama-cpp's logit_bias drops
        logits[0] = -1e9  # the processor list: `list.extend` returns None, llama.py:1339)
        return logits

    from codemoat.engines.llamacpp import load_llama

    llm = load_llama(str(model), n_ctx=256, n_threads=1, seed=seed)  # the CPU path the server would pick
    out = llm.create_completion(
        prompt,
        max_tokens=n,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=seed,
        logits_processor=LogitsProcessorList([no_eos, *(procs or [])]),
    )
    return out["choices"][0]["text"]


def test_green_lists_are_keyed_and_gamma_sized():
    a, b = wm.GreenList(KEY), wm.GreenList(OTHER)
    ma, mb = a.mask(17, 20000), b.mask(17, 20000)
    assert abs(ma.mean() - wm.GAMMA) < 0.02 and abs(mb.mean() - wm.GAMMA) < 0.02
    assert 0.1 < (ma != mb).mean() < 0.5
    assert not np.array_equal(a.mask(18, 20000), ma)
    assert np.array_equal(a.is_green(np.full(5, 17, np.uint32), np.arange(5, dtype=np.uint32)), ma[:5])


def test_processor_gated_by_entropy():
    p = wm.WatermarkProcessor(KEY, delta=2.0, entropy_threshold=1.0)
    peaked = np.full(100, -20.0, np.float32)
    peaked[7] = 10.0
    assert np.array_equal(p([3], peaked), peaked)  # one right answer: left alone
    flat = np.zeros(100, np.float32)
    out = p([3], flat)
    green = p.green.mask(3, 100)
    assert np.all(out[green] == 2.0) and np.all(out[~green] == 0.0)
    assert np.array_equal(p([], flat), flat)
    assert np.all(wm.WatermarkProcessor(KEY, vocab_size=50)([3], flat)[50:] == 0)


def test_binomial_tail_is_exact():
    n, q = 40, 0.25
    for k in (0, 5, 10, 20, 40):
        want = sum(math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(k, n + 1))
        assert wm.binom_tail(k, n, q) == pytest.approx(want, rel=1e-9, abs=1e-15)


@pytest.fixture(scope="module", params=["F32", "Q8_0", "Q4_0"])
def served(request, flat_model, scorer, tmp_path_factory):
    """(model, scorer): the flat model as written, and quantised by llama.cpp as customers' models ship."""
    if request.param == "F32":
        return flat_model, scorer
    from . import attacks

    q = attacks.requantize(
        flat_model, tmp_path_factory.mktemp("wm") / f"flat-{request.param}.gguf", {"Q8_0": 7, "Q4_0": 2}[request.param]
    )
    return q, wm.LlamaScorer(str(q), n_ctx=256)


def test_own_generations_are_detected_and_attributed(served):
    flat_model, scorer = served
    text = _generate(flat_model, [wm.WatermarkProcessor(KEY)])
    res = wm.detect_text(text, scorer.tokenize, {"acme": KEY, "globex": OTHER}, scorer.entropies)
    assert res[0].customer == "acme" and res[0].detected and res[0].scored_tokens > 50
    assert not res[1].detected and res[1].p_adj > 1e-3
    z, p = wm.detect(scorer.tokenize(text), KEY)  # without entropies: every token scored, still found
    assert z > 4 and p < 1e-5


def test_wrong_key_and_unwatermarked_text_are_not_detected(flat_model, scorer):
    marked = _generate(flat_model, [wm.WatermarkProcessor(OTHER)], seed=1)
    plain = _generate(flat_model, None, seed=2)
    for text in (marked, plain):
        res = wm.detect_text(text, scorer.tokenize, {"acme": KEY}, scorer.entropies)
        assert not res[0].detected and res[0].p > 1e-4


def test_human_code_is_not_flagged(scorer):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[40:52]  # not the files the tokenizer was trained on
    keys = {"acme": KEY, "globex": OTHER}
    for f in files:
        ids = scorer.tokenize(f.read_text(errors="replace"))[:500]
        res = wm.detect_ids(ids, keys, scorer.entropies(ids))
        assert not any(s.detected for s in res), f.name


def test_stouffer_aggregate_finds_what_single_completions_miss(flat_model, scorer):
    # 12 completions of 8 tokens each: too short alone, together they name the key
    runs = [scorer.tokenize(_generate(flat_model, [wm.WatermarkProcessor(KEY)], n=8, seed=10 + i)) for i in range(12)]
    ents = [scorer.entropies(ids) for ids in runs]
    keys = {"acme": KEY, "globex": OTHER}
    single = [wm.detect_ids(ids, keys, e) for ids, e in zip(runs, ents)]
    assert sum(s[0].detected for s in single) < len(runs)
    agg = wm.aggregate(runs, keys, ents)
    assert agg[0].customer == "acme" and agg[0].detected and agg[0].scored_tokens > 40
    assert not agg[1].detected
    # the same number of unmarked completions, and a repeated one, are not flagged
    plain = [scorer.tokenize(_generate(flat_model, None, n=8, seed=40 + i)) for i in range(12)]
    assert not any(s.detected for s in wm.aggregate(plain, keys))
    repeated = wm.aggregate([runs[0]] * 50, {"acme": KEY})[0]
    assert repeated.scored_tokens == wm.aggregate([runs[0]], {"acme": KEY})[0].scored_tokens
