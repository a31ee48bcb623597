"""Review of the wildmatch `.gitignore` matcher (index/ignore.py): work that grew as the square of one rule's length.

A committed `.gitignore` may be a single 1 MB line. Turning a rule into a regex was quadratic in its length (each
`[:` inside a `[...]` looked for the next `]` from scratch: `x[[:[:[:...a]`; a literal run grew by `bytes +=`), and
linear in memory at some 350 bytes a byte of rule. Measured by hand in a subprocess before the fixes: 20,000 `[:` took
12 s (500,000: about two hours); 400,000 `?` over a minute. The counts below are of the work done, not of time.
"""

from __future__ import annotations

import re

import pytest

from codemoat.errors import CodemoatError
from codemoat.index.ignore import Ignore, lines, translate


class _Counted(bytes):
    """A rule's bytes that count each index or slice taken of them: the matcher's own work on the rule."""

    reads = 0

    def __getitem__(self, key):
        _Counted.reads += 1
        return bytes.__getitem__(self, key)


def _reads(pat: bytes) -> tuple[int, bytes | None]:
    _Counted.reads = 0
    rx = translate(_Counted(pat))
    return _Counted.reads, rx


def test_a_class_full_of_colons_is_read_in_one_pass():
    """`[:` without its `:]` is a plain `[` in git's class; each one must not re-read the rest of the rule."""
    n = 4000
    pat = b"x[" + b"[:" * n + b"a]"
    reads, rx = _reads(pat)
    assert reads < 10 * len(pat), f"{reads} reads of a {len(pat)}-byte rule: quadratic"
    assert rx is not None
    assert re.fullmatch(rx, b"x:", re.DOTALL) and re.fullmatch(rx, b"x[", re.DOTALL)
    assert re.fullmatch(rx, b"xa", re.DOTALL) and not re.fullmatch(rx, b"xb", re.DOTALL)


def test_a_class_full_of_colons_that_never_closes_matches_nothing():
    """The negative: with no `]` at all the rule is git's aborted match, and nothing is ignored by it."""
    pat = b"x[" + b"[:" * 4000
    reads, rx = _reads(pat)
    assert rx is None and reads < 10 * len(pat)
    assert not Ignore(None, "", lines(pat + b"\n")).ignored("x:", False)


def test_a_rule_longer_than_any_path_the_walk_can_hold_compiles_to_nothing():
    """`**/a/` 200,000 times (1 MB, one rule) compiled to a regex of some 350 MB, kept while the walk is below its
    folder. No path the walk yields is longer than PATH_MAX, so a rule that needs more bytes matches nothing."""
    from codemoat.index.ignore import LONGEST_PATH

    assert translate(b"a/" + b"**/a/" * 200_000) is None
    assert translate(b"*a" * (LONGEST_PATH + 1)) is None and translate(b"?" * (LONGEST_PATH + 1)) is None
    rule = Ignore(None, "", lines(b"**/a/" * 200_000 + b"\n"))
    assert not rule.ignored("a/" * 100 + "a", False)


def test_a_rule_as_long_as_a_path_may_be_still_matches():
    """The negative: up to `LONGEST_PATH` bytes, a rule is matched as git matches it, stars between them too."""
    from codemoat.index.ignore import LONGEST_PATH

    path = "/".join(["a" * 200] * 25)[: LONGEST_PATH - 1] + "b"
    assert len(path) == LONGEST_PATH
    assert Ignore(None, "", [path]).ignored(path, False)
    starred = "**/" + "*".join(path[k : k + 100] for k in range(0, len(path), 100))
    assert Ignore(None, "", [starred]).ignored(path, False)
    assert not Ignore(None, "", [path + "c"]).ignored(path, False)


def test_gitignore_files_past_the_byte_budget_are_a_one_line_refusal(tmp_path, monkeypatch):
    """A few long star-heavy rules (4,000 `*a` each, under any path's length) cost some 400 MB and 10 s a megabyte
    to compile, far under the rule count's budget: a walk compiles at most `MAX_IGNORE_BYTES` of rules."""
    from codemoat.index import walk

    monkeypatch.setattr(walk, "MAX_IGNORE_BYTES", 6_000)
    repo = tmp_path / "repo"
    for d in ("a", "b"):
        (repo / d).mkdir(parents=True)
        (repo / d / ".gitignore").write_text("x" + "*a" * 2000 + "\n")
        (repo / d / "m.py").write_text("M = 1\n")
    with pytest.raises(CodemoatError, match=r"hold more than 6,000 bytes of rules \(the last read: b/.gitignore\)"):
        walk.scan(repo)
    monkeypatch.setattr(walk, "MAX_IGNORE_BYTES", 8_002)  # the negative: within the budget, indexed
    assert walk.scan(repo).paths == ["a/m.py", "b/m.py"]
