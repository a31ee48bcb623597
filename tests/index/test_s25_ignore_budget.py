"""A plain folder's `.gitignore` matching has a budget per walk (`walk.MAX_IGNORE_WORK`, `ignore.Meter`): 99,000
rules like `**/dN/**/*.py`, under the rule and byte caps, cost ~2.7 s for each path 200 folders deep, so a committed
tree of such paths held the walk for days. Past the budget the folder is refused in one line that names the
`.gitignore` that cost the most. The budget is lowered here so that the test is quick; the cost is counted in steps,
not measured in time."""

from __future__ import annotations

from pathlib import Path

import pytest

from codemoat.errors import CodemoatError
from codemoat.index import walk
from codemoat.index.ignore import Ignore, Meter, TooCostly
from codemoat.index.walk import scan


def _tree(root: Path, hostile: bool) -> None:
    (root / ".gitignore").write_text("*.log\n/build/\n")
    evil = root / "evil"
    deep = evil.joinpath(*(f"x{i}" for i in range(30)))
    deep.mkdir(parents=True)
    rules = [f"**/d{i}/**/*.py" for i in range(300)] if hostile else ["*.tmp", "/out/"]
    (evil / ".gitignore").write_text("\n".join(rules) + "\n")
    for i in range(5):
        (deep / f"m{i}.py").write_text(f"M = {i}\n")
    (root / "a.py").write_text("A = 1\n")
    (root / "a.log").write_text("log\n")


def test_hostile_rules_past_the_budget_refuse_the_folder_naming_their_gitignore(tmp_path, monkeypatch):
    _tree(tmp_path, hostile=True)
    monkeypatch.setattr(walk, "MAX_IGNORE_WORK", 50_000)
    monkeypatch.setattr(walk, "MAX_IGNORE_WORK_PER_PATH", 1_000)
    with pytest.raises(CodemoatError, match=r"cost more than 50,000 steps .* \(the costliest: evil/\.gitignore\): not indexed"):
        scan(tmp_path)


def test_ordinary_rules_under_the_same_budget_are_walked(tmp_path, monkeypatch):
    """The negative beside it: the same tree with ordinary rules, and the same small budget, is walked and its rules
    kept."""
    _tree(tmp_path, hostile=False)
    monkeypatch.setattr(walk, "MAX_IGNORE_WORK", 50_000)
    monkeypatch.setattr(walk, "MAX_IGNORE_WORK_PER_PATH", 1_000)
    listed = scan(tmp_path).paths
    assert "a.py" in listed and "a.log" not in listed and len(listed) == 6, listed


def test_many_files_under_many_ordinary_rules_are_walked_however_many(tmp_path, monkeypatch):
    """A reviewer's finding: 370,000 files under 1,500 ordinary rules spent the whole budget of a walk, and an ordinary
    plain folder was refused. Each path now brings its allowance: here 600 files under 200 rules cost ~10 times the
    walk's budget, and each under its allowance, so they are walked; the hostile tree beside it still is not."""
    (tmp_path / ".gitignore").write_text("".join(f"*.tmp{i}\nbuild{i}/\n" for i in range(100)))
    for d in range(20):
        (tmp_path / f"pkg{d}").mkdir()
        for f in range(30):
            (tmp_path / f"pkg{d}" / f"mod_{f}.py").write_text("X = 1\n")
    monkeypatch.setattr(walk, "MAX_IGNORE_WORK", 200_000)
    monkeypatch.setattr(walk, "MAX_IGNORE_WORK_PER_PATH", 20_000)
    assert len(scan(tmp_path).paths) == 600
    monkeypatch.setattr(walk, "MAX_IGNORE_WORK_PER_PATH", 0)  # the budget alone, as before: refused
    with pytest.raises(CodemoatError, match="not indexed"):
        scan(tmp_path)
    hostile = tmp_path / "h"
    hostile.mkdir()
    _tree(hostile, hostile=True)
    monkeypatch.setattr(walk, "MAX_IGNORE_WORK_PER_PATH", 20_000)
    with pytest.raises(CodemoatError, match=r"\(the costliest: evil/\.gitignore\)"):
        scan(hostile)


def test_hostile_rules_under_the_default_budget_are_still_matched_as_git_does(tmp_path):
    """A few such rules are no attack: under the default budget they are matched, and a path they name is ignored."""
    _tree(tmp_path, hostile=True)
    (tmp_path / "evil" / "d7" / "q").mkdir(parents=True)
    (tmp_path / "evil" / "d7" / "q" / "z.py").write_text("Z = 1\n")
    listed = scan(tmp_path).paths
    assert "evil/d7/q/z.py" not in listed and len(listed) == 6, listed


def test_the_meter_names_the_costliest_gitignore():
    meter = Meter(1_000)
    top = Ignore(None, "", ["*.log"], meter)
    evil = Ignore(top, "evil", [f"**/d{i}/**/*.py" for i in range(50)])  # the walk's meter, from its parent
    assert evil.meter is meter
    assert not top.ignored("a.py", False)
    with pytest.raises(TooCostly) as e:
        evil.ignored("evil/x/y/z.py", False)
    assert e.value.base == "evil" and meter.spent[""] < meter.spent["evil"]


def test_no_meter_no_budget():
    """An `Ignore` made without one (tests, other callers) matches as before, with no budget."""
    ignore = Ignore(None, "", [f"**/d{i}/**/*.py" for i in range(50)])
    assert ignore.meter is None and ignore.ignored("a/d3/b/c.py", False) and not ignore.ignored("a/b/c.py", False)


def test_rules_whose_stars_try_long_classes_again_are_costed_by_them(tmp_path, monkeypatch):
    """A reviewer's finding: the meter counted a rule as its stars, so 950 rules of a star and 240 `[ab]` classes
    (918 KB, under every cap) looked like ordinary rules and cost ~170 ms a 250-byte name, within the per-path
    allowance: a tree of 100,000 such files held the walk for hours. `rule_cost` counts what a star may try again
    at each byte; such rules now spend the budget and the folder is refused."""
    from codemoat.index.ignore import rule_cost

    hostile = "*" + "[ab]" * 240 + "c"
    assert rule_cost(hostile.encode()) > 1000 * rule_cost(b"*.ext1234") // 10
    assert rule_cost(b"build") == 1 and rule_cost(b"*.py") == 5
    (tmp_path / ".gitignore").write_text("".join(f"{hostile}{i}\n" for i in range(20)))
    for i in range(10):
        (tmp_path / (f"{i}" + "a" * 240 + ".py")).write_text("X = 1\n")
    monkeypatch.setattr(walk, "MAX_IGNORE_WORK", 10_000_000)  # ~20 such paths' worth
    with pytest.raises(CodemoatError, match=r"\(the costliest: \./\.gitignore\): not indexed"):
        scan(tmp_path)
    (tmp_path / ".gitignore").write_text("".join(f"*.ext{i}\n" for i in range(20)))  # the negative: ordinary rules
    assert len(scan(tmp_path).paths) == 10
