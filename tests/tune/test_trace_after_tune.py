"""Issue 13: `trace` still names the customer after the customer fine-tunes the fingerprinted weights
(200 LoRA steps, `codemoat tune`'s rank and learning rate) and folds the adapter into them, as
llama.cpp's export-lora does, and after requantising the result; the same fine-tune of the clean
original names nobody."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from codemoat.trace import fingerprint
from codemoat.trace.trace_stream import trace_files
from codemoat.tune.lora import gguf_bytes
from tests.trace import attacks
from tests.trace.synth import corpus, tiny_model, train_bpe
from tests.tune.loras import finetune_lora, merge_lora

SECRETS = {f"cust{i:02d}": hashlib.sha256(b"tune-trace-%d" % i).digest() for i in range(10)}
STEPS = 200


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune-trace")
    orig = tiny_model(d / "orig.gguf", seed=0, dtype="F16", tokenizer=train_bpe(320, corpus(20)))
    marked = d / "cust04.gguf"
    marked.write_bytes(fingerprint.fingerprint_model(orig.read_bytes(), "gguf", SECRETS["cust04"]))
    return d, orig, marked


def _tuned(d, src, name):
    model, base = finetune_lora(src, corpus(30)[20:], steps=STEPS)
    return merge_lora(src, gguf_bytes(model, base.hf_config, 16.0, "ft", arch=base.arch), d / name)


@pytest.mark.slow
def test_trace_names_the_customer_after_a_merged_fine_tune(models):
    d, orig, marked = models
    tuned = _tuned(d, marked, "tuned.gguf")
    from codemoat.trace import gguf_io

    with gguf_io.open_gguf(marked.read_bytes()) as a, gguf_io.open_gguf(tuned.read_bytes()) as b:
        wa = gguf_io.dequantize(next(t for t in a.tensors if t.name == "blk.0.attn_q.weight"))
        wb = gguf_io.dequantize(next(t for t in b.tensors if t.name == "blk.0.attn_q.weight"))
    mark = np.abs(fingerprint.embed(wa, SECRETS["cust04"], "blk.0.attn_q.weight") - wa).mean()
    assert np.abs(wb - wa).mean() > mark  # the fine-tune moved the weights by more than the mark itself
    r = trace_files(tuned, orig, SECRETS)
    assert r.named == ["cust04"] and all(s.p_adj > 1e-3 for s in r.scores[1:])
    q = attacks.requantize(tuned, d / "tuned-q4km.gguf", 15)  # and then requantised to Q4_K_M
    assert trace_files(q, orig, SECRETS).named == ["cust04"]


@pytest.mark.slow
def test_the_same_fine_tune_of_the_clean_original_names_nobody(models):
    d, orig, _ = models
    tuned = _tuned(d, orig, "clean-tuned.gguf")
    assert trace_files(tuned, orig, SECRETS).named == []
