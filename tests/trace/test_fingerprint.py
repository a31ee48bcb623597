"""Weight fingerprints: embed, trace, and the attacks a leaker would try (tiny GGUFs built here)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from codemoat.errors import CodemoatError
from codemoat.trace import detect, fingerprint, gguf_io, st_io
from codemoat.trace.detect import trace
from codemoat.trace.trace_stream import trace_files

from . import attacks
from .synth import Shape, random_weights, write_gguf


@pytest.fixture(scope="module")
def marked(f16_model: Path, secrets, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("marked")
    data = f16_model.read_bytes()
    paths = {}
    for c in ("cust03", "cust11"):
        paths[c] = out / f"{c}.gguf"
        paths[c].write_bytes(fingerprint.fingerprint_model(data, "gguf", secrets[c]))
    return paths


def test_pattern_is_keyed_and_seekable():
    a = fingerprint.pattern(b"k" * 32, "w", 100, 0, 10)
    assert set(np.unique(a)) == {-1.0, 1.0} and abs(a.mean()) < 0.1
    assert np.array_equal(fingerprint.pattern(b"k" * 32, "w", 100, 4, 7), a[4:7])
    assert not np.array_equal(fingerprint.pattern(b"j" * 32, "w", 100, 0, 10), a)
    assert not np.array_equal(fingerprint.pattern(b"k" * 32, "v", 100, 0, 10), a)


def test_fingerprint_keeps_layout_and_names_the_customer(f16_model, marked, secrets):
    data = f16_model.read_bytes()
    assert len(marked["cust03"].read_bytes()) == len(data) and marked["cust03"].read_bytes() != data
    r = trace_files(marked["cust03"], f16_model, secrets)
    assert r.named == ["cust03"]
    assert r.scores[0].customer == "cust03" and r.scores[0].p_adj < 1e-9
    assert all(s.p_adj > 1e-3 for s in r.scores[1:])


def test_fingerprinted_model_still_loads_and_barely_changes(f16_model, marked):
    from llama_cpp import Llama

    def logits(path):
        m = Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
        ids = m.tokenize(b"def add(a, b):\n    return a + b\n", add_bos=False)
        m.eval(ids)
        return np.asarray(m.scores[: len(ids)], dtype=np.float64)

    a, b = logits(f16_model), logits(marked["cust03"])
    pa = np.exp(a - a.max(1, keepdims=True))
    pa /= pa.sum(1, keepdims=True)
    pb = np.exp(b - b.max(1, keepdims=True))
    pb /= pb.sum(1, keepdims=True)
    kl = float(np.mean(np.sum(pa * (np.log(pa) - np.log(pb)), axis=1)))
    assert 0 < kl < 1e-2


def test_clean_original_gives_no_verdict(f16_model, secrets):
    r = trace_files(f16_model, f16_model, secrets)
    assert r.named == [] and all(s.z == 0 and s.p == 1.0 for s in r.scores)


def test_unrelated_model_gives_no_verdict(unrelated_model, f16_model, secrets):
    r = trace_files(unrelated_model, f16_model, secrets)
    assert r.named == [] and r.positions > 10_000
    assert all(s.p_adj > 1e-3 for s in r.scores)


def test_other_architecture_is_refused(f16_model, tokenizer, tmp_path, secrets):
    s = Shape(n_embd=96, n_ff=192)
    other = write_gguf(tmp_path / "wide.gguf", s, random_weights(s, 5), *tokenizer)
    with pytest.raises(CodemoatError, match="shares no weight matrix"):
        trace_files(other, f16_model, secrets)


@pytest.mark.parametrize("ftype", [7, 15], ids=["Q8_0", "Q4_K_M"])
def test_requantised_copy_is_traced(marked, f16_model, secrets, tmp_path, ftype):
    q = attacks.requantize(marked["cust11"], tmp_path / "q.gguf", ftype)
    assert gguf_io.tensor_kinds(gguf_io._reader(q))["blk.0.ffn_up.weight"] != "F16"
    assert trace_files(q, f16_model, secrets).named == ["cust11"]
    # the marked, quantised copy still serves, on the CPU path the self-test picks (issue 12)
    import asyncio

    from codemoat.engines.base import SamplingParams
    from codemoat.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine.from_path(q, n_ctx=64, n_threads=1)
    try:
        assert eng.health()["cpu_buffers"]["path"] in ("extra", "safe")
        assert asyncio.run(eng.complete("def ", SamplingParams(max_tokens=4, temperature=0.0))).completion_tokens >= 1
    finally:
        eng.close()


def test_noise_and_pruning_are_survived(marked, f16_model, secrets, tmp_path):
    for name, fn in (("noise", attacks.noise(0.05)), ("prune", attacks.prune(0.3))):
        d = attacks.transform(marked["cust03"], tmp_path / f"{name}.gguf", fn)
        assert trace_files(d, f16_model, secrets).named == ["cust03"], name


def test_permutation_is_realigned(marked, f16_model, secrets, tmp_path):
    p = attacks.transform(marked["cust03"], tmp_path / "perm.gguf", attacks.permute(3))
    r = trace_files(p, f16_model, secrets)
    assert r.named == ["cust03"]
    assert {k for k in r.realigned if k.startswith("mlp.")} == {"mlp.0", "mlp.1"}
    assert any(k.startswith("attn.") for k in r.realigned)
    # without re-alignment the permuted copy would escape: the re-alignment is what names it
    s, _, _ = detect.load(p)
    o, _, names = detect.load(f16_model)
    moved = [n for n in names if ".ffn_" in n]  # MLP matrices: every layer's units were shuffled
    res = detect.residuals(s, o, moved)
    assert detect.p_value(detect.score(res, secrets["cust03"])) * len(secrets) > 1e-9
    assert trace(s, o, secrets, names=moved).named == ["cust03"]  # trace re-aligns s in place


def test_two_colluders_are_both_named(marked, f16_model, secrets, tmp_path):
    d = attacks.transform(marked["cust03"], tmp_path / "avg.gguf", attacks.average(marked["cust11"]))
    assert sorted(trace_files(d, f16_model, secrets).named) == ["cust03", "cust11"]


def test_q8_0_model_is_fingerprinted_in_place(tokenizer, tmp_path, secrets):
    s = Shape()
    q8 = write_gguf(tmp_path / "q8.gguf", s, random_weights(s, 0), *tokenizer, dtype="Q8_0")
    out = tmp_path / "q8-marked.gguf"
    out.write_bytes(fingerprint.fingerprint_model(q8.read_bytes(), "gguf", secrets["cust07"]))
    assert gguf_io.tensor_kinds(gguf_io._reader(out))["blk.0.ffn_up.weight"] == "Q8_0"
    assert trace_files(out, q8, secrets).named == ["cust07"]


def test_gguf_of_unmarkable_types_is_refused(tokenizer, tmp_path, secrets):
    s = Shape()
    q41 = write_gguf(tmp_path / "q4_1.gguf", s, random_weights(s, 0), *tokenizer, dtype="Q4_1")
    with pytest.raises(CodemoatError, match="no tensor that can carry a fingerprint"):
        fingerprint.fingerprint_model(q41.read_bytes(), "gguf", secrets["cust01"])


def _safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.torch import save
    import torch

    return save({k: torch.from_numpy(v).to(torch.bfloat16 if k.endswith("bf16") else torch.float32) for k, v in tensors.items()})


def test_safetensors_f32_and_bf16(secrets):
    rng = np.random.default_rng(0)
    w = {
        "a.weight": (0.02 * rng.standard_normal((256, 128))).astype(np.float32),
        "b.weight.bf16": (0.02 * rng.standard_normal((256, 128))).astype(np.float32),
        "norm": np.ones(128, np.float32),
    }
    data = _safetensors(w)
    marked = fingerprint.fingerprint_model(data, "safetensors", secrets["cust05"])
    assert len(marked) == len(data)
    before, after = st_io.read_matrices(data), st_io.read_matrices(marked)
    assert set(after) == {"a.weight", "b.weight.bf16"}
    assert np.abs(after["a.weight"] - before["a.weight"]).max() > 0
    r = trace(after, before, secrets)
    assert r.named == ["cust05"] and r.tensors == 2
    assert trace(st_io.read_matrices(data), before, secrets).named == []


def test_bad_inputs_fail_in_one_line(secrets):
    with pytest.raises(CodemoatError, match="format"):
        fingerprint.fingerprint_model(b"xx", "onnx", secrets["cust01"])
    with pytest.raises(CodemoatError, match="16 bytes"):
        fingerprint.fingerprint_model(b"xx", "gguf", b"short")
    with pytest.raises(CodemoatError, match="GGUF"):
        fingerprint.fingerprint_model(b"GGUF" + bytes(40), "gguf", secrets["cust01"])
    with pytest.raises(CodemoatError, match="no customers"):
        trace({}, {}, {})
    assert hashlib  # secrets fixture is derived with hashlib
