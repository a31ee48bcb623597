"""A plain folder's `.gitignore` matcher against the `git` binary: seeded random trees and rule sets, the files the
walk yields compared with those `git ls-files --others` lists (git's own reading of the same `.gitignore` files).

By hand, many more rule sets, the mismatch count and the first few:
    .venv/bin/python tests/index/test_gitignore_differential.py 5000
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from codemoat.index.walk import _walk

git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")

DIRS = ["a", "b", "ab", "src", "x.d", "[a]", "é", "ba", "d"]
FILES = [
    "a.py", "b.py", "ab.py", "c.txt", "x", "]", "!n.py", "#h.py", "sp ", "a b.py", "q*.py", "q?.py", "[a].py",
    "A.PY", "é.py", "\udce9x.py", "a\\b.py", "a\tb", "x-y", "9.md", ":c", "ba.py", "aab.py", "xa",
]  # fmt: skip
# Rule fragments for one path segment: literals, wildcards, classes (edge ones too), escapes, bytes that are not UTF-8
SEGMENTS = [
    "a", "b", "ab", "src", "x.d", "a.py", "c.txt", "x", "ln", "*", "*.py", "a*", "?.py", "??.py", "?", "[a-c].py", "[!a]*",
    "[]]", "[]a]*", "[!]]*", "[z-a]*", "[[:alpha:]]*", "[[:digit:]].md", "[[:bogus:]]*", "[[:x]*", "a[", "[a-]*",
    "[-a]*", "\\[a\\]*", "[\\]]", "q\\*.py", "q\\?.py", "\\!n.py", "!n.py", "\\#h.py", "sp\\ ", "a\\ b.py", "a b.py",
    "é*", "?.py", "\udce9*", "a\\\\b.py", "a**", "**.py", "a*b*", "*\\", "x-y", "[w-z]-y", "[x-]-y", ":c", "[:c",
    "[[:]c", "[^a]*", "A.PY", "a\tb",
]  # fmt: skip
FORMS = [
    "{s}", "{s}", "{s}", "/{s}", "{s}/", "/{s}/", "{d}/{s}", "{d}/{s}/", "/{d}/{s}", "**/{s}", "**/{s}/", "{d}/**",
    "{d}/**/{s}", "{d}/*/{s}", "{d}/*", "{d}/**/", "**/{d}/**", "{d}/?{s}", "{d}**/{s}", "*/{s}", "{d}/{d}/{s}",
    "**", "{d}//", "//{s}", "{d}/**/**/{s}", "{d}/***/{s}", "{d}\\/{s}", "{d}/**\\/{s}",
]  # fmt: skip
DIR_SEGMENTS = ["ln", "a", "b", "ab", "src", "*", "a*", "[ab]", "?", "x.d", "[[]a]", "\\[a]", "é", "\udce9*", "**"]


# Runs of stars, slashes and short literals: several `*` and `**/` in one rule, where backtracking is cut short
TOKENS = ["*", "*", "**", "**/", "/", "/", "a", "b", "?", "[ab]", ".py", "a*", "*/", "x", "d"]


def _rule(rnd: random.Random) -> str:
    if rnd.random() < 0.25:
        line = "".join(rnd.choices(TOKENS, k=rnd.randint(2, 9)))
    else:
        line = rnd.choice(FORMS).format(s=rnd.choice(SEGMENTS), d=rnd.choice(DIR_SEGMENTS))
    if rnd.random() < 0.3:
        line = "!" + line
    r = rnd.random()
    if r < 0.08:
        line += " " * rnd.randint(1, 3)  # stripped
    elif r < 0.1:
        line += "\t"  # kept
    return line


def _gitignore(rnd: random.Random) -> bytes:
    out = []
    for _ in range(rnd.randint(1, 8)):
        r = rnd.random()
        out.append("# a comment" if r < 0.05 else "" if r < 0.1 else _rule(rnd))
    eol = b"\r\n" if rnd.random() < 0.1 else b"\n"
    text = eol.join(ln.encode("utf-8", "surrogateescape") for ln in out)
    return (b"\xef\xbb\xbf" if rnd.random() < 0.05 else b"") + text + (eol if rnd.random() < 0.8 else b"")


def _tree(rnd: random.Random, root: Path) -> None:
    """Folders three deep of random names, files in each, a `.gitignore` in some (relative to their own folder)."""
    folders = [root]
    for depth in range(3):
        for parent in [f for f in folders if len(f.relative_to(root).parts) == depth]:
            for name in rnd.sample(DIRS, rnd.randint(1 if depth < 2 else 0, 3)):
                (parent / name).mkdir()
                folders.append(parent / name)
    for folder in folders:
        for name in rnd.sample(FILES, rnd.randint(2, 6)):
            (folder / name).write_bytes(b"x\n")
        if folder != root and rnd.random() < 0.2:  # a link to a folder: a file to git's `name/` rules, never entered
            (folder / rnd.choice(["ln", "a.py.d"])).symlink_to("..", target_is_directory=True)
        if folder == root or rnd.random() < 0.4:
            (folder / ".gitignore").write_bytes(_gitignore(rnd))


def _env(home: Path) -> dict[str, str]:
    """git with no configuration but its own: a developer's global excludes file must not change the verdicts."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull, "LC_ALL": "C"}  # fmt: skip


def _git_listing(root: Path, gitdir: Path) -> set[bytes]:
    env = _env(gitdir)
    if not (gitdir / "HEAD").exists():
        subprocess.run(["git", "init", "-q", "--bare", str(gitdir)], check=True, env=env)
    out = subprocess.run(
        ["git", "--git-dir", str(gitdir), "--work-tree", str(root), "-c", "core.ignorecase=false",
         "-c", "core.bare=false", "ls-files", "-z", "--others", "--exclude-per-directory=.gitignore"],
        check=True, capture_output=True, env=env, cwd=root,
    ).stdout  # fmt: skip
    return {p for p in out.split(b"\0") if p}


def mismatches(seed: int, scratch: Path) -> str | None:
    """None where the walk yields exactly the files git lists for seed's tree, else what differs and the rules."""
    rnd = random.Random(seed)
    root = scratch / f"t{seed}"
    root.mkdir()
    try:
        _tree(rnd, root)
        want = _git_listing(root, scratch / "git")
        got = {os.fsencode(p) for p in _walk(root)}
        if got == want:
            return None
        rules = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob(".gitignore"))}
        return f"seed {seed}: walk only {sorted(got - want)}, git only {sorted(want - got)}; rules {rules}"
    finally:
        shutil.rmtree(root)


SEEDS = range(1000, 1200)


@git
def test_gitignore_walk_matches_git_on_random_rule_sets(tmp_path):
    """Every mismatch with git either hides code from retrieval or indexes what the customer told it to ignore. Before
    the wildmatch translation this found, among others: `*` crossing `/` in a rule with a `/` (`a/*` hid `a/b/c.py`),
    `\\` escapes other than a leading `\\#`/`\\!`, unclosed and reversed classes, `[!]]`, `**` not between slashes,
    `//` forms, escaped trailing spaces, tabs stripped, the leading `**/` form joined with a `/**` suffix that a later
    `!` could not undo, and `?` matching a whole non-ASCII character where git matches a byte."""
    failed = [m for seed in SEEDS if (m := mismatches(seed, tmp_path)) is not None]
    assert not failed, f"{len(failed)} of {len(SEEDS)} rule sets differ from git; first: " + "\n".join(failed[:3])


@git
def test_gitignore_differential_agrees_where_git_does_on_a_fixed_tree(tmp_path):
    """The negative beside the random test: on plain rules where any matcher agrees with git, the comparison passes
    and the walk does ignore files (the differential is not vacuous: git and the walk both hide them)."""
    root = tmp_path / "t"
    (root / "a" / "b").mkdir(parents=True)
    for rel in ("keep.py", "drop.log", "a/keep.py", "a/b/drop.log", "a/b/keep.py"):
        (root / rel).write_bytes(b"x\n")
    (root / ".gitignore").write_bytes(b"*.log\n")
    want = _git_listing(root, tmp_path / "git")
    assert {os.fsencode(p) for p in _walk(root)} == want
    assert b"drop.log" not in want and b"a/b/keep.py" in want


def _main(n: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        failed = [m for seed in range(n) if (m := mismatches(seed, Path(d))) is not None]
    print(f"{len(failed)} of {n} rule sets differ from git")
    for m in failed[:5]:
        print(m)


if __name__ == "__main__":
    _main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
