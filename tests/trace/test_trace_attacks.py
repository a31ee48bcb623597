"""A leaked copy shaped to evade `trace` (outside review, helper R2), on the streamed GGUF trace
(trace_stream.py) and the in-memory one of safetensors suspects (detect.trace): a few weights per matrix moved far, or set to NaN/Inf, made the residual's norm
dwarf the mark and the verdict vanish (z 339 -> 4.6 with 16 weights per matrix at 20 sigma). Each
residual is now clipped at a multiple of the median magnitude and non-finite ones dropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from codemoat.trace import detect, fingerprint
from codemoat.trace.trace_stream import trace_files

from . import attacks


@pytest.fixture(scope="module")
def marked(f16_model: Path, secrets, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("evade") / "cust05.gguf"
    p.write_bytes(fingerprint.fingerprint_model(f16_model.read_bytes(), "gguf", secrets["cust05"]))
    return p


def _outliers(k: int, c: float, seed: int = 0):
    """k weights of every matrix moved by c times the matrix's standard deviation."""

    def fn(m: dict, meta: dict) -> None:
        rng = np.random.default_rng(seed)
        for w in m.values():
            idx = rng.choice(w.size, k, replace=False)
            w.flat[idx] += c * float(w.std()) * rng.choice([-1.0, 1.0], k)

    return fn


def _one(value: float):
    def fn(m: dict, meta: dict) -> None:
        for w in m.values():
            w[-1, 0] = value

    return fn


@pytest.mark.filterwarnings("error::RuntimeWarning")  # Inf in a suspect printed two numpy warnings in align
@pytest.mark.parametrize(
    "what, fn",
    [("16 at 20 sigma", _outliers(16, 20)), ("64 at 5 sigma", _outliers(64, 5)), ("NaN", _one(np.nan)), ("Inf", _one(np.inf))],
)
def test_a_few_far_weights_do_not_hide_the_mark(what, fn, marked, f16_model, secrets, tmp_path):
    """Was broken for '16 at 20 sigma', NaN and Inf: no verdict (z 4.6, 0, 0). No RuntimeWarning either (align
    gave two for Inf: invalid value in add and in divide)."""
    d = attacks.transform(marked, tmp_path / "evade.gguf", fn)
    r = trace_files(d, f16_model, secrets)
    assert r.named == ["cust05"], (what, r.as_dict()["scores"][:2])
    s, _, _ = detect.load(d)  # the in-memory trace (a safetensors suspect): the same residuals
    o, meta, names = detect.load(f16_model)
    assert detect.trace(s, o, secrets, names=names, meta=meta).named == ["cust05"], what


@pytest.mark.parametrize("fn", [_outliers(16, 20), _one(np.nan)])
def test_the_same_edits_of_the_original_name_no_one(fn, f16_model, secrets, tmp_path):
    """The negative: clipping depends on the residuals alone, so an unmarked copy stays unnamed."""
    d = attacks.transform(f16_model, tmp_path / "edited.gguf", fn)
    assert trace_files(d, f16_model, secrets).named == []
