"""One case per way the plain-folder `.gitignore` matcher differed from git: what the walk yields equals what
`git ls-files --others` lists for the same folder, and that listing is the one written down here (so each case says
what git does, and fails if either git or the walk disagrees)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from codemoat.index.ignore import Ignore, lines, translate
from codemoat.index.walk import _walk

from test_gitignore_differential import _env, _git_listing, git

# id: (.gitignore bytes, files to create, the files git hides of them)
CASES = {
    # `*`, `?` and `[...]` never match a `/` in a rule that holds one
    "star-stays-in-its-folder": (b"a/*.py\n", ["a/c.py", "a/b/c.py"], {"a/c.py"}),
    "qmark-stays-in-its-folder": (b"a/x?y.py\n", ["a/xzy.py", "a/x/y.py"], {"a/xzy.py"}),
    "class-stays-in-its-folder": (b"a/x[/z]y.py\n", ["a/xzy.py", "a/x/y.py"], {"a/xzy.py"}),
    "double-star-not-between-slashes-is-a-star": (b"d/**.py\n", ["d/x.py", "d/e/x.py"], {"d/x.py"}),
    # a rule that hid a folder could not be undone for what is inside it once `!` re-included the folder
    "re-included-folder-keeps-its-files": (b"x/*\n!x/y/\n", ["x/f.py", "x/y/z.py"], {"x/f.py"}),
    # `\` escapes any character, not only a leading `#` or `!`
    "escaped-star-is-a-star": (b"q\\*.py\n", ["q*.py", "qz.py"], {"q*.py"}),
    "escaped-space-inside": (b"a\\ b.py\n", ["a b.py", "a\\ b.py"], {"a b.py"}),
    "escaped-leading-bang": (b"\\!n.py\n", ["!n.py", "n.py"], {"!n.py"}),
    "trailing-backslash-matches-nothing": (b"x\\\n", ["x", "x\\"], set()),
    # trailing spaces go unless escaped; a tab stays
    "trailing-spaces-stripped": (b"a.py   \n", ["a.py"], {"a.py"}),
    "escaped-trailing-space-kept": (b"sp\\ \n", ["sp ", "sp"], {"sp "}),
    "trailing-tab-kept": (b"a.py\t\n", ["a.py", "a.py\t"], {"a.py\t"}),
    # classes as wildmatch reads them
    "unclosed-bracket-matches-nothing": (b"a[\n", ["a[", "a"], set()),
    "first-close-bracket-is-a-member": (b"[]]\n[!]]x\n", ["]", "ax", "]x"], {"]", "ax"}),
    "reversed-range-keeps-its-first-member": (b"[z-a]*\n", ["a.py", "m.py", "z.py"], {"z.py"}),
    "named-class": (b"[[:digit:]].md\n", ["9.md", "a.md"], {"9.md"}),
    "unknown-named-class-matches-nothing": (b"[[:bogus:]]*\n", ["b.py", ":.py"], set()),
    "caret-negates": (b"[^a]*.py\n", ["a.py", "b.py"], {"b.py"}),
    # git compares bytes: `?` is one byte of a two-byte `é`
    "qmark-is-one-byte": (b"?.py\n", ["\u00e9.py", "a.py"], {"a.py"}),
    "two-qmarks-match-a-two-byte-character": (b"??.py\n", ["\u00e9.py", "ab.py", "a.py"], {"\u00e9.py", "ab.py"}),
    "bytes-not-utf8": (b"\xe9*\n", ["\udce9x.py", "\u00e9x.py"], {"\udce9x.py"}),
    # one trailing or leading `/` is taken off, not all of them
    "double-trailing-slash-matches-nothing": (b"a//\n", ["a/f.py"], set()),
    "double-leading-slash-matches-nothing": (b"//f.py\n", ["f.py"], set()),
    # git compares a rule's literal start apart, so a `**` just after it counts as at the start
    "literal-prefix-then-double-star": (
        b"a**/b.py\n",
        ["ab.py", "a/b.py", "ax/y/b.py", "a/c.py"],
        {"ab.py", "a/b.py", "ax/y/b.py"},
    ),
    # several `**/` in one rule: a folder run between them fits where it first can (the regexes commit to that)
    "double-stars-take-the-first-fit": (
        b"**/a/**/a/b.py\n",
        ["a/a/b.py", "a/x/a/b.py", "a/b.py", "a/a/a/b.py"],
        {"a/a/b.py", "a/x/a/b.py", "a/a/a/b.py"},
    ),
    "star-takes-the-first-fit": (
        b"d/*a*b.py\n",
        ["d/aab.py", "d/ab.py", "d/bab.py", "d/a/b.py"],
        {"d/aab.py", "d/ab.py", "d/bab.py"},
    ),
    # lines split at `\n` only; a byte-order mark is not part of the first rule; a NUL ends a line
    "form-feed-is-not-a-line-break": (b"a\x0cb\n", ["a", "b", "a\x0cb"], {"a\x0cb"}),
    "byte-order-mark-skipped": (b"\xef\xbb\xbfsecret.py\n", ["secret.py", "ok.py"], {"secret.py"}),
    "nul-ends-the-line": (b"secret.py\0junk\n", ["secret.py", "ok.py"], {"secret.py"}),
    "crlf": (b"secret.py\r\nold.py\r\n", ["secret.py", "old.py", "ok.py"], {"secret.py", "old.py"}),
}


@git
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_gitignore_rule_matches_as_git_does(tmp_path, case):
    rules, files, hidden = CASES[case]
    root = tmp_path / "t"
    root.mkdir()
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x\n")
    (root / ".gitignore").write_bytes(rules)
    want = {os.fsencode(p) for p in [".gitignore", *files] if p not in hidden}
    assert _git_listing(root, tmp_path / "git") == want  # the case says what git does
    assert {os.fsencode(p) for p in _walk(root)} == want


def test_a_rule_no_path_can_match_is_dropped_not_an_error():
    """Malformed rules (unclosed `[`, a trailing `\\`, an unknown class) are git's "matches nothing", never a regex
    error that would stop the walk; a well-formed rule beside them still works."""
    assert translate(b"a[") is None and translate(b"x\\") is None and translate(b"[[:bogus:]]") is None
    ignore = Ignore(None, "", lines(b"a[\nx\\\n[[:bogus:]]\n[z-a]\n*.log\n"))
    assert ignore.ignored("run.log", False) and not ignore.ignored("a[", False) and not ignore.ignored("m", False)


STAR_TOKENS = ["*", "*", "**", "**/", "/", "/", "a", "b", "?", "[ab]", ".py", "a*", "*/", "x", "\\*", "[!a]", "a/", "**/a/"]
NAMES = ["a", "b", "ab", "ba", "x", "a.py", "ab.py", "xa", "*", "aab.py", "bx"]


@git
def test_star_heavy_rules_match_the_paths_git_check_ignore_says(tmp_path):
    """Rules of many `*`, `**/` and `**` (the regexes cut their backtracking short, so the first place that fits is
    the only one tried: this holds them to git on deep paths): each rule hides the paths `git check-ignore` says it
    does, and no other (the negative: most paths are not hidden by most rules)."""
    rnd = random.Random(7)
    rules = ["".join(rnd.choices(STAR_TOKENS, k=rnd.randint(2, 10))).rstrip("/") or "x" for _ in range(150)]
    paths = sorted({"/".join(rnd.choices(NAMES, k=rnd.randint(1, 8))) for _ in range(800)})
    root = tmp_path / "t"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True, env=_env(tmp_path))
    mismatched, hidden = [], 0
    for rule in rules:
        (root / ".gitignore").write_bytes(rule.encode() + b"\n")
        out = subprocess.run(
            ["git", "-C", str(root), "check-ignore", "--no-index", "-z", "--stdin"],
            input="\0".join(paths).encode() + b"\0", capture_output=True, env=_env(tmp_path),
        ).stdout  # fmt: skip
        want = {p.decode() for p in out.split(b"\0") if p}
        ignore = Ignore(None, "", [rule])
        # check-ignore names a path under a hidden folder too (the walk never enters that folder)
        got = {p for p in paths if any(ignore.ignored("/".join(p.split("/")[:i]), True) for i in range(1, p.count("/") + 1))
               or ignore.ignored(p, False)}  # fmt: skip
        hidden += len(got)
        if got != want:
            mismatched.append((rule, sorted(got ^ want)[:3]))
    assert not mismatched
    assert 0 < hidden < len(rules) * len(paths) // 2


HOSTILE = """
import sys
from codemoat.index.ignore import Ignore
rules = ["x/" + "*a" * 14 + "*b", "**/" + "a*/**/" * 8 + "zz", "a/" + "**/a/" * 8 + "zz", "**/" * 14 + "zz", "*a" * 14 + "*b"]
deep = "/".join(["a"] * 200)
paths = ["x/" + "a" * 300 + "c", deep + "/y", deep + "/zz", "a" * 300 + "c", "a" * 300 + "b"]
ignore = Ignore(None, "", rules)
print([ignore.ignored(p, False) for p in paths])
"""


def test_a_rule_of_many_stars_does_not_hold_the_walk():
    """A committed rule such as `*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b`, or `**/a*/` eight times over, against a long name
    or a folder 200 deep: a backtracking regex tries a power of the path's length of ways (years); cut short, a few
    thousand steps. The timeout only stops a hung run (the fixed one takes milliseconds); the verdicts are git's."""
    out = subprocess.run([sys.executable, "-c", HOSTILE], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[False, False, True, False, True]"


@git
def test_named_classes_hold_the_bytes_git_says(tmp_path):
    """`[[:space:]]`, `[[:punct:]]` and the rest hold git's own ASCII sets (its `space` has no `\\v` or `\\f`), not
    Python's or the C library's: each class against every byte but `/` and `\\n`, as `git check-ignore` sees them."""
    from codemoat.index.ignore import _CLASSES

    root = tmp_path / "t"
    subprocess.run(["git", "init", "-q", str(root)], check=True, env=_env(tmp_path))
    paths = [b"x" + bytes([c]) for c in range(1, 256) if c not in b"/\n"]
    for name in _CLASSES:
        rule = b"x[[:" + name + b":]]"
        (root / ".gitignore").write_bytes(rule + b"\n")
        out = subprocess.run(
            ["git", "-C", str(root), "check-ignore", "--no-index", "-z", "--stdin"],
            input=b"\0".join(paths) + b"\0", capture_output=True, env=_env(tmp_path),
        ).stdout  # fmt: skip
        ignore = Ignore(None, "", lines(rule))
        got = {p for p in paths if ignore.ignored(p.decode("utf-8", "surrogateescape"), False)}
        assert got == {p for p in out.split(b"\0") if p}, name
        assert got and len(got) < len(paths)
