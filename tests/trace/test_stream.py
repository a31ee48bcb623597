"""Marking quantised GGUFs in their integer codes, streamed: codes round-trip, the mark survives
requantisation, a streamed seal carries it, and trace reads both files tensor by tensor."""

from __future__ import annotations

import numpy as np
import pytest

from codemoat.errors import CodemoatError
from codemoat.trace import fingerprint, quant
from codemoat.trace.trace_stream import trace_files
from codemoat.trace.gguf_stream import GGUFFile

from . import attacks
from .synth import Shape, random_weights, write_gguf


def _blocks(kind: str, n: int, rng) -> np.ndarray:
    """n random blocks of `kind` with finite, small scales."""
    L = quant.LAYOUTS[kind]
    raw = rng.integers(0, 256, size=(n, L.nbytes), dtype=np.uint8)
    at = 208 if kind == "Q6_K" else 0
    raw[:, at : at + 2] = rng.uniform(-0.01, 0.01, (n, 1)).astype(np.float16).view(np.uint8)
    if kind in ("Q4_K", "Q5_K"):
        raw[:, 2:4] = rng.uniform(0, 0.01, (n, 1)).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("kind", list(quant.LAYOUTS))
def test_codes_round_trip_through_llama_cpps_dequantiser(kind):
    rng = np.random.default_rng(1)
    L = quant.LAYOUTS[kind]
    raw = _blocks(kind, 64, rng)
    before = quant.to_float(raw.reshape(8, -1), kind, 8 * L.block).ravel()
    bi, ei = np.repeat(np.arange(64), L.block), np.tile(np.arange(L.block), 64)
    q, step = quant.codes_at(raw, kind, bi, ei)
    move = rng.choice([-1, 1], len(bi))
    ok = (rng.random(len(bi)) < 0.3) & (q + move >= L.qmin) & (q + move <= L.qmax)  # neighbours in one byte too
    changed = raw.copy()
    quant.set_codes_at(changed, kind, bi[ok], ei[ok], (q + move)[ok])
    after = quant.to_float(changed.reshape(8, -1), kind, 8 * L.block).ravel()
    # a code moved by ±1 moves its weight by exactly one step; nothing else in the block moves
    np.testing.assert_allclose(after - before, np.where(ok, move * step, 0), atol=1e-6)
    assert np.count_nonzero(after != before) == np.count_nonzero(ok & (step != 0))
    assert np.array_equal(quant.codes_at(changed, kind, bi, ei)[0], np.where(ok, q + move, q))


def test_selection_is_keyed_seekable_and_sparse():
    k1, k2 = b"a" * 32, b"b" * 32
    n = 2 * fingerprint.SEGMENT
    pos, sign = fingerprint.selection(k1, "w", n, 0, 2, n)
    assert 1.5 * fingerprint.PER_SEGMENT < len(pos) <= 2 * fingerprint.PER_SEGMENT and set(np.unique(sign)) == {-1, 1}
    assert len(np.unique(pos)) == len(pos) and pos.max() < 2 * fingerprint.SEGMENT
    later, _ = fingerprint.selection(k1, "w", n, 1, 2, n)
    assert np.array_equal(later, pos[pos >= fingerprint.SEGMENT])
    assert not np.array_equal(fingerprint.selection(k2, "w", n, 0, 2, n)[0], pos)
    small, _ = fingerprint.selection(k1, "w", 5000, 0, 1)  # a small tensor still carries positions
    assert 10 < len(small) and small.max() < 5000


@pytest.fixture(scope="module")
def k_model(tokenizer, tmp_path_factory):
    """A llama GGUF with 256-wide rows, requantised by llama.cpp to Q4_K_M (Q4_K and Q6_K tensors)."""
    d = tmp_path_factory.mktemp("kq")
    s = Shape(n_embd=256, n_ff=512, n_head=4, n_head_kv=2)
    f16 = write_gguf(d / "f16.gguf", s, random_weights(s, 4), *tokenizer, dtype="F16")
    return attacks.requantize(f16, d / "q4km.gguf", 15)


def test_k_quant_model_is_marked_in_its_codes_and_traced(k_model, secrets, tmp_path):
    with GGUFFile(k_model) as g:
        kinds = {t.kind for t in g.tensors if len(t.shape) == 2}
    assert {"Q4_K", "Q6_K"} <= kinds
    marked = tmp_path / "marked.gguf"
    marked.write_bytes(fingerprint.fingerprint_model(k_model.read_bytes(), "gguf", secrets["cust09"]))
    with GGUFFile(k_model) as a, GGUFFile(marked) as b:
        assert a.header_size == b.header_size and a.file_size == b.file_size
        for t in a.tensors:
            assert b.by_name[t.name].kind == t.kind
            if t.kind in ("Q4_K", "Q6_K"):
                ra, rb = a.raw_rows(t, 0, t.rows).reshape(-1, t.block_bytes), b.raw_rows(t, 0, t.rows).reshape(-1, t.block_bytes)
                scales = slice(0, 16) if t.kind == "Q4_K" else slice(192, 210)
                assert np.array_equal(ra[:, scales], rb[:, scales])  # every block scale kept
                d = b.matrix(t) - a.matrix(t)
                assert 0 < np.count_nonzero(d) <= fingerprint.PER_SEGMENT
    r = trace_files(marked, k_model, secrets)
    assert r.named == ["cust09"] and all(s.p_adj > 1e-3 for s in r.scores[1:])
    for ftype, label in ((7, "Q8_0"), (2, "Q4_0")):  # the leaker requantises the marked copy
        q = attacks.requantize(marked, tmp_path / f"{label}.gguf", ftype)
        assert trace_files(q, k_model, secrets).named == ["cust09"], label
    clean = attacks.requantize(k_model, tmp_path / "clean-q8.gguf", 7)
    assert trace_files(clean, k_model, secrets).named == []
    assert trace_files(k_model, k_model, secrets).named == []


def test_streamed_seal_carries_the_mark(k_model, secrets, tmp_path):
    from codemoat.vault.vendor import Vendor

    v = Vendor.init(tmp_path / "v")
    try:
        v.seal(k_model, "acme", tmp_path / "acme.moat", fingerprint=fingerprint.fingerprint_model)
        v.unseal(tmp_path / "acme.moat", tmp_path / "leak.gguf")
        want = fingerprint.fingerprint_model(k_model.read_bytes(), "gguf", v.customer("acme").fingerprint_secret)
        assert (tmp_path / "leak.gguf").read_bytes() == want
        keys = {c.name: c.fingerprint_secret for c in (v.customer("acme"), v.customer("globex"))}
    finally:
        v.close()
    assert trace_files(tmp_path / "leak.gguf", k_model, keys).named == ["acme"]


def test_damaged_gguf_is_one_line(k_model, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(k_model.read_bytes()[:200])
    with pytest.raises(CodemoatError, match="truncated or not a valid GGUF"):
        GGUFFile(cut)
    with pytest.raises(CodemoatError, match="truncated or not a valid GGUF"):
        fingerprint.stream_gguf(cut, b"k" * 32)
