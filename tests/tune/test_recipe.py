"""The tuning recipe's guards against forgetting and over-training: replayed public code never includes
the modules the forgetting check scores, and the adapter written is the state that scored best on
validation files set aside from training, the untuned start included."""

from __future__ import annotations

import pytest

from tests.tune.test_tune import _index


def _replayed() -> set[str]:
    """Every module the replay can take (its sample with no size limit), as stdlib-relative paths."""
    from codemoat.tune.evaluate import replay_files

    return {f.path.split("/", 1)[1] for f in replay_files(max_chars=10**12)}


def test_replayed_code_is_never_the_forgetting_checks_code():
    from codemoat.tune.evaluate import REPLAY_CHARS, forgetting_validation_files, replay_files, unrelated_files

    replayed = replay_files()
    assert REPLAY_CHARS <= sum(len(f.text) for f in replayed) < REPLAY_CHARS + 200_000
    assert replay_files(seed=1) != replayed and replay_files() == replayed  # a seeded sample
    everything = replay_files(max_chars=10**12)
    for checked in (unrelated_files(), forgetting_validation_files()):
        assert checked
        assert not {f.path for f in everything} & {f.path for f in checked}
        assert not {f.text for f in everything} & {f.text for f in checked}


def test_the_replay_is_the_bundled_models_own_training_code():
    """Replay rehearses what the base learnt from: on CPython 3.11 every module the replay can take is
    one of the bundled model's 638 training modules (less the old forgetting check's), none held out.
    Until session 10 it was sixteen of them."""
    import sys
    import sysconfig
    from pathlib import Path

    from codemoat.train.corpus import collect, split
    from codemoat.tune.evaluate import SEEN_MODULES

    if sys.version_info[:2] != (3, 11):
        pytest.skip("the bundled model was trained on CPython 3.11's standard library")
    train, held = split(collect([Path(sysconfig.get_paths()["stdlib"])]), 0.06, 0)
    trained = {f.path.split("/", 1)[1] for f in train}
    assert len(trained) == 638 and _replayed() == trained - set(SEEN_MODULES)


FILES = {f"shop/mod{i}.py": f"def price_{i}(cents: int) -> int:\n    return cents * {i + 3} // 100\n" * 8 for i in range(14)}


def _opts(tmp_path, base, **kw):
    from codemoat.tune.trainer import TuneOptions

    o = dict(repos=["shop"], out=tmp_path / "a.moat", base=base, steps=3, rank=4, batch_size=2, n_ctx=64, ema=0.0, kl=0.0)
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


@pytest.mark.slow
def test_the_kept_state_forgot_at_most_max_forgetting_of_unseen_public_code(tmp_path, tiny_gguf, monkeypatch):
    """Forgetting-aware selection: of the same run's states, the one kept without a limit (the last:
    validation still falling) made unseen public code worse; with `max_forgetting = 0` an earlier state
    that did not is kept, and the final forgetting check sees less forgetting. The guard watches four
    modules on which this random test model's four states differ that way (the shipped guard's two,
    never trained on by the bundled model, were no worse at step 4 here: the limit had nothing to hold back)."""
    from codemoat.tune import evaluate
    from codemoat.tune.trainer import tune

    monkeypatch.setattr(evaluate, "FORGETTING_VALIDATION_MODULES", ["inspect.py", "typing.py", "statistics.py", "ast.py"])
    _index(tmp_path, "shop", FILES, ["shop"])
    free = tune(_opts(tmp_path, tiny_gguf, lr=5e-3, steps=4, replay=0, max_forgetting=None)).meta
    held = tune(_opts(tmp_path, tiny_gguf, lr=5e-3, steps=4, replay=0, max_forgetting=0.0, out=tmp_path / "b.moat")).meta
    assert free["train"]["kept_step"] == 4
    base, kept = held["train"]["forgetting_validation_bpb"]
    assert 0 < held["train"]["kept_step"] < 4 and kept <= base
    assert held["eval"]["bpb_adapter"]["unrelated"] < free["eval"]["bpb_adapter"]["unrelated"]


def test_forgetting_validation_code_is_neither_replayed_nor_scored():
    from codemoat.tune.evaluate import FORGETTING_VALIDATION_MODULES, UNRELATED_MODULES

    assert FORGETTING_VALIDATION_MODULES
    assert not set(FORGETTING_VALIDATION_MODULES) & (_replayed() | set(UNRELATED_MODULES))


def test_the_forgetting_checks_score_code_the_bundled_model_never_trained_on():
    """Both the final check and the guard that picks the kept state score CPython modules outside the
    bundled model's training set (rebuilt as `vendor train` split it: 638 modules of CPython 3.11);
    before, nine of the final check's ten modules and all four of the guard's were training files."""
    import sys
    import sysconfig
    from pathlib import Path

    from codemoat.train.corpus import collect, split
    from codemoat.tune.evaluate import FORGETTING_VALIDATION_MODULES, UNRELATED_MODULES, forgetting_validation_files

    if sys.version_info[:2] != (3, 11):
        pytest.skip("the bundled model was trained on CPython 3.11's standard library")
    train, _ = split(collect([Path(sysconfig.get_paths()["stdlib"])]), 0.06, 0)
    trained = {f.path.split("/", 1)[1] for f in train}
    assert len(trained) == 638  # models/codemoat-tiny.train.json's train_files
    assert not trained & (set(UNRELATED_MODULES) | set(FORGETTING_VALIDATION_MODULES))
    assert sum(len(f.text) for f in forgetting_validation_files()) > 100_000


def test_data_tables_are_not_code_to_learn_from():
    from codemoat.tune.corpus import is_data_table

    table = "WIDTHS = [\n" + "".join(f"    ({i * 7}, {i * 7 + 3}, {i % 3 - 1}),\n" for i in range(300)) + "]\n"
    assert is_data_table(table)
    assert not is_data_table(FILES["shop/mod1.py"])
    assert not is_data_table("def f(x):\n    return x * 1000 + 42\n")


@pytest.mark.slow
def test_a_data_table_in_the_repository_is_not_trained_on(tmp_path, tiny_gguf):
    from codemoat.tune.trainer import tune

    from codemoat.train.corpus import SourceFile, split

    table = "W = [\n" + "".join(f"    ({i}, {i + 3}, 1),\n" for i in range(400)) + "]\n"
    # a name the seeded split by file makes a training file (a held-out table is scored, as it should be)
    name = next(n for n in (f"shop/_widths{i}.py" for i in range(50)) if split([SourceFile(f"shop/{n}", "")], 0.1, 0)[0])
    _index(tmp_path, "shop", {**FILES, name: table}, ["shop"])
    t = tune(_opts(tmp_path, tiny_gguf, lr=5e-3, steps=2)).meta["train"]
    assert f"shop/{name}" not in t["heldout_files"]
    assert t["data_tables"] == 1 and t["files"] + t["validation_files"] == len(FILES) - len(t["heldout_files"])


@pytest.mark.slow
def test_with_ema_the_adapter_written_is_the_average_of_the_weights_not_the_last_step(tmp_path, tiny_gguf):
    """`ema`: the states scored, kept and written are a moving average of the adapter's weights. An
    average that forgets its start this slowly (0.999) is still almost the untuned start (lora_B
    starts at zero) after a few steps that moved the last weights far; without averaging (or with the
    option ignored) the adapter written is those last weights."""
    import torch
    from safetensors.torch import load

    from codemoat.engines.adapters import open_adapter
    from codemoat.tune.trainer import tune

    _index(tmp_path, "shop", FILES, ["shop"])
    kw = dict(lr=5e-3, steps=4, replay=0, max_forgetting=None, eval_every=100)
    raw = tune(_opts(tmp_path, tiny_gguf, **kw))
    avg = tune(_opts(tmp_path, tiny_gguf, ema=0.999, out=tmp_path / "b.moat", **kw))

    def b_norm(res) -> float:
        sd = load(open_adapter(res.out).safetensors)
        return sum(float(torch.linalg.norm(v)) for k, v in sd.items() if "lora_B" in k)

    assert avg.meta["train"]["ema"] == 0.999 and raw.meta["train"]["ema"] == 0.0
    assert raw.meta["train"]["kept_step"] == 4 and b_norm(raw) > 0
    assert b_norm(avg) < 0.01 * b_norm(raw)
    e_raw, e_avg = raw.meta["eval"], avg.meta["eval"]
    assert e_avg["bpb_adapter"]["tuned"] == pytest.approx(e_avg["bpb_base"]["tuned"], rel=1e-3)
    assert e_raw["bpb_adapter"]["tuned"] != pytest.approx(e_raw["bpb_base"]["tuned"], rel=1e-3)


@pytest.mark.slow
def test_with_kl_the_model_drifts_less_from_the_base_on_code_it_did_not_tune_on(tmp_path, tiny_gguf):
    """`kl`: the replayed rows' predictions are also pulled towards the base's own (distillation). The
    same run without that term (or with the option ignored) moves the unrelated CPython modules'
    score further from the base's."""
    from codemoat.tune.trainer import tune

    _index(tmp_path, "shop", FILES, ["shop"])
    kw = dict(lr=5e-3, steps=4, replay=0.5, max_forgetting=None, eval_every=100)
    free = tune(_opts(tmp_path, tiny_gguf, **kw)).meta
    held = tune(_opts(tmp_path, tiny_gguf, kl=10.0, out=tmp_path / "b.moat", **kw)).meta

    def drift(meta) -> float:
        e = meta["eval"]
        return abs(e["bpb_adapter"]["unrelated"] - e["bpb_base"]["unrelated"])

    assert held["train"]["kl"] == 10.0 and free["train"]["kl"] == 0.0
    assert held["train"]["kept_step"] == free["train"]["kept_step"] == 4
    assert 0 < drift(held) < 0.5 * drift(free)


def test_an_ema_decay_or_kl_weight_out_of_range_is_refused(tmp_path, tiny_gguf):
    from codemoat.errors import CodemoatError
    from codemoat.tune.trainer import tune

    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(CodemoatError, match="--ema must be from 0 to below 1"):
            tune(_opts(tmp_path, tiny_gguf, ema=bad))
    for bad in (-0.1, 11.0, float("nan")):
        with pytest.raises(CodemoatError, match="--kl must be from 0 to 10"):
            tune(_opts(tmp_path, tiny_gguf, kl=bad))


def test_the_forgetting_check_scores_cpython_modules_the_bundled_model_never_trained_on():
    """The forgetting goal is on 'CPython held-out modules': before, nine of the ten scored modules were
    the bundled model's own training files (only shlex.py is in models/heldout.txt)."""
    from pathlib import Path

    from codemoat.tune.evaluate import FORGETTING_VALIDATION_MODULES, UNRELATED_MODULES, unrelated_files

    heldout = Path(__file__).resolve().parents[2] / "models" / "heldout.txt"
    never_trained = {
        line.strip().split("/", 1)[1] for line in heldout.read_text().splitlines() if line.strip() and line[0] != "#"
    }
    assert set(UNRELATED_MODULES) == never_trained
    assert not set(UNRELATED_MODULES) & (_replayed() | set(FORGETTING_VALIDATION_MODULES))
    scored = unrelated_files()
    assert len(scored) == len(UNRELATED_MODULES) and sum(len(f.text) for f in scored) > 150_000  # a stable figure


def test_the_held_out_score_counts_every_held_out_file_small_ones_whole():
    """The goal's held-out figure was the first N tokens in path order: on rich + httpx two of fifteen
    files. Now every file counts, up to the same number of tokens each, the budget a small file leaves
    going to the others."""
    from pathlib import Path

    from tokenizers import Tokenizer

    from codemoat.train.corpus import SourceFile
    from codemoat.tune.evaluate import per_file_tokens, spread_windows, token_windows

    tok = Tokenizer.from_file(str(Path(__file__).resolve().parents[2] / "models" / "codemoat-tiny.hf" / "tokenizer.json"))
    small = SourceFile("r/a_small.py", "x = 1\n")
    big = [
        SourceFile(f"r/b{i}.py", "".join(f"def f{i}_{j}(a, b):\n    return a * {j} + b\n" for j in range(300))) for i in range(2)
    ]
    files = [small, *big]

    def predicted(f):
        return len(tok.encode(f.text, add_special_tokens=False).ids) - 1

    assert predicted(small) < 10 and min(predicted(f) for f in big) > 1000
    cap = per_file_tokens(files, tok, 1000)
    assert cap == (1000 - predicted(small)) // 2  # the small file whole, the rest shared by the big ones
    windows, nbytes = spread_windows(files, tok, 64, 1000)
    assert sum(len(w) - 1 for w in windows) == predicted(small) + 2 * cap <= 1000
    each = [spread_windows([f], tok, 64, 10**6)[1] for f in files]  # every file whole
    assert nbytes > each[0] and nbytes < sum(each)
    first = token_windows(files, tok, 64, 1000)[0]  # the old figure: path order, so the second big file not at all
    assert sum(len(w) - 1 for w in first) == 1000 < predicted(small) + predicted(big[0])
    assert per_file_tokens(files, tok, 10**6) == max(predicted(f) for f in big)  # a budget for all: every file whole
