"""`codemoat tune --replay/--max-forgetting/--ema/--kl`: the command line hands the recipe's guards against
forgetting to the trainer (the adapter's record says what it ran with), and refuses a value out of
range in one line before anything loads."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_bad_input_cli import one_line_error
from tests.conftest import run_cli
from tests.tune.test_recipe import FILES
from tests.tune.test_tune import _index


@pytest.mark.slow
def test_replay_and_max_forgetting_reach_the_trainer(tmp_path, tiny_gguf, home):
    _index(tmp_path, "shop", FILES, ["shop"])
    common = ["tune", "--repos", "shop", "--model", str(tiny_gguf), "--steps", "1", "--rank", "2", "--threads", "1"]
    common += ["--eval-tokens", "100", "--infill-lines", "0", "--json"]
    r = run_cli(
        *common,
        "--out",
        str(tmp_path / "a.moat"),
        "--replay",
        "0.25",
        "--max-forgetting",
        "0.03",
        "--ema",
        "0.9",
        "--kl",
        "0.5",
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)["train"]
    assert t["replay"] == 0.25 and t["max_forgetting"] == 0.03  # the defaults are 0.5 and 0.015
    assert t["ema"] == 0.9 and t["kl"] == 0.5
    b = tmp_path / "b.moat"
    b.write_bytes(b"an older adapter")  # replaced with --force (without it: test_an_existing_out_needs_force)
    r = run_cli(*common, "--out", str(b), "--replay", "0", "--max-forgetting", "off", "--force", timeout=600)
    assert r.returncode == 0, r.stderr
    assert b.read_bytes() != b"an older adapter"
    t = json.loads(r.stdout)["train"]
    assert t["replay"] == 0 and t["max_forgetting"] is None and t["forgetting_validation_bpb"] == [None, None]


def test_out_of_range_values_are_refused_in_one_line(tmp_path, home):
    args = ["tune", "--repos", "shop", "--out", str(tmp_path / "a.moat"), "--model", str(tmp_path / "m.gguf")]
    one_line_error(run_cli(*args, "--replay", "0.9"), "Invalid value for '--replay'", 2)
    one_line_error(run_cli(*args, "--replay", "-0.1"), "Invalid value for '--replay'", 2)
    for bad in ("-1", "1.5", "nan", "lots"):
        one_line_error(run_cli(*args, "--max-forgetting", bad), "Invalid value for '--max-forgetting'", 2)
    for bad in ("1", "-0.5"):
        one_line_error(run_cli(*args, "--ema", bad), "Invalid value for '--ema'", 2)
    for bad in ("-0.1", "11"):
        one_line_error(run_cli(*args, "--kl", bad), "Invalid value for '--kl'", 2)
    assert not (tmp_path / "a.moat").exists()


def test_an_existing_out_needs_force(tmp_path, home):
    """`tune --out` over an existing file refuses in one line naming it and --force, before any training (it
    replaced the file silently after the run); the file is left as it was. A killed run still resumes: its
    checkpoint is kept in the home, and --out is written only when the run ends."""
    out = tmp_path / "a.moat"
    out.write_bytes(b"an adapter tuned last week")
    args = ["tune", "--repos", "shop", "--out", str(out), "--model", str(tmp_path / "m.gguf")]
    one_line_error(run_cli(*args), f"{out} exists: pass --force to replace it")
    assert out.read_bytes() == b"an adapter tuned last week"
    # with --force the run goes on (here to the next thing wrong: nothing indexed in this home)
    one_line_error(run_cli(*args, "--force"), "no indexed repository named 'shop'")
    assert out.read_bytes() == b"an adapter tuned last week"


def test_options_that_never_finish_or_fail_late_are_refused_in_one_line(tmp_path, home):
    """A negative --steps or a NaN --minutes trained for ever (the budget's end was never reached); a
    negative --threads, --lr or --infill-lines, or a seed past 64 bits, failed with Python's words
    ('ValueError: Sample larger than population or is negative'), some once the base was loaded and
    scored. Each is refused in one line naming the option, before anything loads."""
    args = ["tune", "--repos", "shop", "--out", str(tmp_path / "a.moat"), "--model", str(tmp_path / "m.gguf")]
    for opt, bad, said in (
        ("--steps", "-1", "--steps must be at least 1"),
        ("--minutes", "nan", "--minutes must be"),
        ("--minutes", "inf", "--minutes must be"),
        ("--lr", "nan", "--lr must be a positive number"),
        ("--lr", "-0.001", "--lr must be a positive number"),
        ("--threads", "-2", "--threads must be at least 1"),
        ("--threads", "0", "--threads must be at least 1"),
        ("--infill-lines", "-3", "--infill-lines at least 0"),
        ("--eval-tokens", "0", "--eval-tokens must be at least 1"),
        ("--seed", str(2**64), "--seed must be from 0"),
        ("--seed", "-1", "--seed must be from 0"),
    ):
        one_line_error(run_cli(*args, opt, bad), said)
    assert not (tmp_path / "a.moat").exists()
    # in range, the run goes on to the next thing wrong (nothing indexed in this home)
    one_line_error(
        run_cli(*args, "--steps", "3", "--threads", "1", "--seed", str(2**63 - 1)), "no indexed repository named 'shop'"
    )
