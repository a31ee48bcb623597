"""The tuning recipe's guards against forgetting and over-training: replayed public code never includes
the modules the forgetting check scores, and the adapter written is the state that scored best on
validation files set aside from training, the untuned start included."""

from __future__ import annotations

import pytest

from tests.tune.test_tune import _index


def test_replayed_code_is_never_the_forgetting_checks_code():
    from codemoat.tune.evaluate import REPLAY_MODULES, UNRELATED_MODULES, replay_files, unrelated_files

    assert not set(REPLAY_MODULES) & set(UNRELATED_MODULES)
    replayed, scored = replay_files(), unrelated_files()
    assert len(replayed) >= 10 and scored
    assert not {f.path for f in replayed} & {f.path for f in scored}
    assert not {f.text for f in replayed} & {f.text for f in scored}


FILES = {f"shop/mod{i}.py": f"def price_{i}(cents: int) -> int:\n    return cents * {i + 3} // 100\n" * 8 for i in range(14)}


def _opts(tmp_path, base, **kw):
    from codemoat.tune.trainer import TuneOptions

    o = dict(repos=["shop"], out=tmp_path / "a.moat", base=base, steps=3, rank=4, batch_size=2, n_ctx=64)
    o.update(eval_tokens=150, threads=1, infill_lines=0, eval_every=1, val_fraction=0.3)
    return TuneOptions(**{**o, **kw})


@pytest.mark.slow
def test_a_run_that_only_made_things_worse_writes_an_adapter_that_changes_nothing(tmp_path, tiny_gguf):
    from codemoat.tune.trainer import tune

    _index(tmp_path, "shop", FILES, ["shop"])
    res = tune(_opts(tmp_path, tiny_gguf, lr=50.0))  # every step wrecks the model
    t, ev = res.meta["train"], res.meta["eval"]
    assert t["validation_files"] >= 1 and t["steps"] == 3 and t["kept_step"] == 0
    assert ev["bpb_adapter"]["tuned"] == pytest.approx(ev["bpb_base"]["tuned"], rel=1e-6)
    assert ev["bpb_adapter"]["unrelated"] == pytest.approx(ev["bpb_base"]["unrelated"], rel=1e-6)


@pytest.mark.slow
def test_a_run_that_learns_keeps_a_trained_state_and_replays(tmp_path, tiny_gguf):
    from codemoat.tune.trainer import tune

    _index(tmp_path, "shop", FILES, ["shop"])
    res = tune(_opts(tmp_path, tiny_gguf, lr=5e-3, steps=4, replay=0.5))
    t = res.meta["train"]
    assert t["kept_step"] > 0 and t["replay"] == 0.5 and t["validation_bpb"] is not None
    assert res.meta["eval"]["bpb_adapter"]["tuned"] != res.meta["eval"]["bpb_base"]["tuned"]
