"""`codemoat tune` on a real index and the bundled model: only the named repositories, split by file,
evaluated before and after, sealed with what it was trained on; llama.cpp serves the GGUF adapter
with the logits PEFT computes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError
from codemoat.index.store import SqliteIndex
from codemoat.index.update import add_repository
from codemoat.tune.corpus import load_corpus
from tests.conftest import run_cli
from tests.tune.loras import peft_vs_llamacpp

PAY = {
    "payments/fees.py": "def interchange_fee(amount_cents: int) -> int:\n    return amount_cents * 15 // 1000\n" * 6,
    "payments/checkout.py": "from payments.fees import interchange_fee\n\n\ndef total(c):\n    return c + interchange_fee(c)\n"
    * 5,
    "payments/refunds.py": "def refund(amount_cents: int) -> int:\n    return -amount_cents\n" * 8,
}
SECRET = {"ops/keys.py": "ROOT_PASSWORD = 'hunter2-ops-only'\n" * 10}


def _index(tmp_path: Path, name: str, files: dict[str, str], groups: list[str]) -> Path:
    root = tmp_path / name
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    store = SqliteIndex()
    add_repository(store, root, name, groups)
    store.close()
    return root


def tune_options(out: Path, base: Path, **overrides):
    """`TuneOptions` for a short tune of the payments repo on `base`: the tests' small sizes, `overrides` win."""
    from codemoat.tune.trainer import TuneOptions

    small = dict(repos=["payments"], out=out, base=base, steps=2, rank=4, batch_size=1, n_ctx=64, lr=1e-3, ema=0.0, kl=0.0)
    return TuneOptions(**{**small, "eval_tokens": 100, "threads": 2, "infill_lines": 2, **overrides})


def test_corpus_holds_only_the_named_repositories(tmp_path):
    _index(tmp_path, "payments", PAY, ["payments"])
    _index(tmp_path, "ops", SECRET, ["ops"])
    c = load_corpus(["payments"])
    assert sorted(f.path for f in c.files) == sorted(f"payments/{p}" for p in PAY)
    assert not any("hunter2" in f.text for f in c.files)
    assert [r.name for r in c.repos] == ["payments"] and c.repos[0].groups == ("payments",)


def test_a_file_changed_since_indexing_is_not_trained_on(tmp_path):
    root = _index(tmp_path, "payments", PAY, ["payments"])
    (root / "payments/refunds.py").write_text("LEAKED = 'not reviewed'\n")
    c = load_corpus(["payments"])
    assert c.skipped == 1 and not any("LEAKED" in f.text for f in c.files)


def test_a_symlink_swapped_in_after_indexing_is_not_followed(tmp_path):
    root = _index(tmp_path, "payments", PAY, ["payments"])
    outside = tmp_path / "outside.py"
    outside.write_text(PAY["payments/fees.py"])  # same bytes, same hash: only the link check stops it
    (root / "payments/fees.py").unlink()
    os.symlink(outside, root / "payments/fees.py")
    c = load_corpus(["payments"])
    assert c.skipped == 1 and "payments/payments/fees.py" not in [f.path for f in c.files]


def test_a_fifo_swapped_in_after_indexing_is_skipped_not_waited_on(tmp_path):
    """A file replaced by a named pipe after indexing: tune read it with a blocking open, so `codemoat
    tune` waited for a writer for good. It is read as `index update` reads (regular files only)."""
    import threading

    root = _index(tmp_path, "payments", PAY, ["payments"])
    (root / "payments/fees.py").unlink()
    os.mkfifo(root / "payments/fees.py")
    got: list = []
    t = threading.Thread(target=lambda: got.append(load_corpus(["payments"])), daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # the code before the fix: release the blocked open (a writer arrives), then fail
        os.close(os.open(root / "payments/fees.py", os.O_WRONLY | os.O_NONBLOCK))
        t.join(20)
        pytest.fail("load_corpus blocked on a FIFO in the repository")
    assert got[0].skipped == 1 and "payments/payments/fees.py" not in [f.path for f in got[0].files]


def test_unknown_repository_is_one_line_error(tmp_path):
    with pytest.raises(CodemoatError, match="no indexed repository named 'nope'"):
        load_corpus(["nope"])
    r = run_cli("tune", "--repos", "nope", "--out", str(tmp_path / "a.moat"), "--model", str(tmp_path / "m.gguf"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_tune_end_to_end(tmp_path, tiny_gguf):
    """A short tune: the adapter records base digest, repositories and groups; held-out files are
    not trained on; its GGUF loads in llama.cpp from a memfd and matches PEFT's logits."""

    from codemoat.tune.base import file_sha256
    from codemoat.engines.adapters import open_adapter
    from codemoat.tune.trainer import tune

    _index(tmp_path, "payments", PAY, ["payments", "finance"])
    _index(tmp_path, "ops", SECRET, ["ops"])
    out = tmp_path / "pay.moat"
    res = tune(tune_options(out, tiny_gguf, steps=3, n_ctx=128, eval_tokens=200, old_eval_tokens=100, lr=5e-3, infill_lines=4))
    a = open_adapter(out)
    assert a.meta["base"]["sha256"] == file_sha256(tiny_gguf)
    assert a.meta["repos"] == [{"name": "payments", "groups": ["finance", "payments"]}]
    held = set(a.meta["train"]["heldout_files"])
    assert held and held < {f"payments/{p}" for p in PAY}
    ev = a.meta["eval"]
    for k in ("tuned", "unrelated", "tuned_first", "unrelated_seen"):  # the last two: the old figures, asked for
        assert ev["bpb_base"][k] > 0 and ev["bpb_adapter"][k] > 0
    assert 0 < ev["heldout_tokens_scored"] <= 200 and ev["heldout_tokens_per_file"] * len(held) >= ev["heldout_tokens_scored"]
    assert ev["bpb_adapter"]["tuned"] != ev["bpb_base"]["tuned"]
    for k in ("infill_base", "infill_adapter"):  # single-line infill on held-out lines, base vs tuned
        assert ev[k]["n"] == 4 and 0 <= ev[k]["exact"] <= 1 and 0 <= ev[k]["edit_sim"] <= 1
    assert res.meta["train"]["steps"] == 3

    assert json.loads(a.peft_config)["r"] == 4


@pytest.mark.slow
def test_gguf_adapter_in_llamacpp_matches_peft(tiny_gguf):
    """llama.cpp with the GGUF adapter (from a memfd) gives PEFT's logits; a wrong q/k permutation,
    an A/B swap or a wrong alpha would not (the adapter moves the logits far more than the tolerance)."""
    err, moved = peft_vs_llamacpp(tiny_gguf, "def interchange_fee(amount_cents: int) -> int:")
    assert err < 0.05, err
    assert moved > 20 * max(err, 0.05)  # the adapter really changes the output
