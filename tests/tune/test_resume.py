"""A killed `codemoat tune` resumes from its last checkpoint (kept 0600 in the private data folder)
and ends with the very adapter an uninterrupted run makes; a different run never picks it up; a
finished run removes it."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from tests.tune.test_tune import PAY, _index, tune_options


class Killed(BaseException):
    pass


def _opts(out: Path, tiny: Path, **kw):
    return tune_options(out, tiny, **{"steps": 6, "threads": 1, **kw, "checkpoint_steps": 3})


def _lora(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    from codemoat.engines.adapters import open_adapter

    return load(open_adapter(out).safetensors)


@pytest.mark.slow
@pytest.mark.parametrize("ema", [0.0, 0.8])  # with --ema the checkpoint carries the averaged weights too
def test_a_killed_tune_resumes_and_ends_where_an_unbroken_one_does(tmp_path, tiny_gguf, home, ema):
    from codemoat.tune.trainer import tune

    _index(tmp_path, "payments", PAY, ["payments"])
    tune(_opts(tmp_path / "whole.moat", tiny_gguf, ema=ema))

    out = tmp_path / "pay.moat"
    seen: list[int] = []

    def kill_at_4(ev: dict) -> None:
        if ev["kind"] == "step":
            seen.append(ev["step"])
            if ev["step"] == 4:
                raise Killed  # like SIGKILL: nothing after this step runs (its own checkpoint would be at 6)

    with pytest.raises(Killed):
        tune(_opts(out, tiny_gguf, ema=ema), kill_at_4)
    ckpts = list((Path(home) / "tune").glob("*.ckpt"))
    assert len(ckpts) == 1 and stat.S_IMODE(ckpts[0].stat().st_mode) == 0o600
    assert not out.exists()

    stages: list[str] = []
    res = tune(_opts(out, tiny_gguf, ema=ema), lambda ev: stages.append(ev.get("stage", "")))
    assert "resuming from step 3" in stages and res.meta["train"]["resumed_from_step"] == 3
    assert res.meta["train"]["steps"] == 6
    a, b = _lora(tmp_path / "whole.moat"), _lora(out)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert not list((Path(home) / "tune").glob("*.ckpt"))  # removed once the adapter is sealed


def test_only_the_same_run_picks_the_checkpoint_up_and_a_damaged_one_is_ignored(tmp_path, home):
    import torch

    from codemoat.tune import checkpoint

    o = _opts(tmp_path / "pay.moat", tmp_path / "base.gguf")
    k = checkpoint.key(o, "ab" * 32)
    assert k == checkpoint.key(_opts(tmp_path / "pay.moat", tmp_path / "base.gguf"), "ab" * 32)
    for other in (
        dict(seed=1),
        dict(rank=8),
        dict(repos=["payments", "ops"]),
        dict(out=tmp_path / "x.moat"),
        dict(lr=4e-4),
        dict(eval_tokens=999),
        dict(old_eval_tokens=6000),
        dict(infill_lines=7),  # the base's infill score was over the other run's lines
        dict(kl=0.5),
    ):  # the base's scores are in the checkpoint
        assert checkpoint.key(_opts(**{"out": tmp_path / "pay.moat", "tiny": tmp_path / "base.gguf", **other}), "ab" * 32) != k
    assert checkpoint.key(o, "cd" * 32) != k  # another base model
    p = checkpoint.path_for(k)
    checkpoint.save(p, {"w": torch.ones(2)}, {}, {"step": 3})
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and stat.S_IMODE(p.parent.stat().st_mode) == 0o700
    assert checkpoint.load(p)["state"]["step"] == 3
    p.write_bytes(p.read_bytes()[:100])
    assert checkpoint.load(p) is None  # damaged: the run starts over
