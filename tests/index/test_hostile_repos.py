"""A repository crafted to hurt the indexer: file names that are not UTF-8 or carry control characters,
folders thousands deep, a repository added inside an indexed one — each is named or handled, never a
traceback, raw terminal text, or another group's code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import httpx
import pytest

from codemoat.errors import CodemoatError
from codemoat.index.store import SqliteIndex
from codemoat.index.update import add_repository, update_repository
from codemoat.index.walk import scan
from codemoat.retrieve import Retriever
from conftest import create_token, run_cli

git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
OK = "def hello_world(name):\n    return 'hello ' + name\n"


def _git_add(repo) -> None:
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)


def _paths(store: SqliteIndex) -> list[str]:
    return sorted(p for (p,) in store.db.execute("SELECT path FROM files"))


@pytest.mark.parametrize("kind", [pytest.param("git", marks=git), "plain"])
def test_a_file_name_that_is_not_utf8_is_named_and_the_rest_indexed(tmp_path, kind):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "ok.py").write_text(OK)
    with open(os.path.join(os.fsencode(repo), b"\xff\xfename.py"), "w") as f:
        f.write("def bad_name_function():\n    return 2\n")
    if kind == "git":
        _git_add(repo)
    store = SqliteIndex()
    stats = add_repository(store, repo, "repo", ["everyone"])  # the walk's name made SQLite raise before
    assert _paths(store) == ["ok.py"]
    assert stats.refused == {"\\xff\\xfename.py": "file name is not UTF-8 (never read)"}  # git's listing dropped it quietly
    store.close()


@git
def test_control_characters_in_file_names_never_reach_the_terminal_or_the_index(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "ok.py").write_text(OK)
    (repo / "e\x1b[2J\x1b]0;owned\x07.py").write_text("def escape_function():\n    return 1\n")
    (repo / "two\nlines.py").write_text("def newline_function():\n    return 1\n")
    (repo / "l\x1b[31mnk.py").symlink_to("/etc/passwd")
    _git_add(repo)
    r = run_cli("index", "add", str(repo), "--name", "repo")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout + r.stderr
    assert "e\\x1b[2J\\x1b]0;owned\\x07.py: file name has control characters" in r.stdout.replace("\n", "")
    assert "two\\x0alines.py" in r.stdout and "l\\x1b[31mnk.py" in r.stdout
    report = json.loads(run_cli("index", "update", "repo", "--json").stdout)[0]
    assert sorted(report["refused"]) == ["e\\x1b[2J\\x1b]0;owned\\x07.py", "l\\x1b[31mnk.py", "two\\x0alines.py"]
    assert _paths(SqliteIndex()) == ["ok.py"]  # a path in a snippet's header is one plain line


@pytest.mark.parametrize("gitignores", [False, True], ids=["bare", "a-gitignore-in-each"])
def test_a_plain_folder_thousands_of_folders_deep_is_walked(tmp_path, gitignores):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "ok.py").write_text(OK)
    depth = 1200  # past Python's recursion limit
    fd = os.open(repo, os.O_RDONLY)
    for _ in range(depth):
        if gitignores:  # each folder's rules apply under the ones of the folders above it
            with open(os.open(".gitignore", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "w") as f:
                f.write("ignored_*.py\n")
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    with open(os.open("deep.py", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "w") as f:
        f.write("def deepest_function():\n    return 3\n")
    with open(os.open("ignored_too.py", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "w") as f:
        f.write("def ignored_function():\n    return 4\n")
    os.close(fd)
    try:
        store = SqliteIndex()
        add_repository(store, repo, "repo", ["everyone"])
        deep = ["deep.py"] if gitignores else ["deep.py", "ignored_too.py"]
        assert _paths(store) == [*("d/" * depth + p for p in deep), "ok.py"]
        store.close()
    finally:  # pytest's own clean-up of old temporary folders recurses, and would fail on this one
        for n in range(depth, 0, -1):
            here = repo / ("d/" * n)
            for f in os.listdir(here):
                os.unlink(here / f)
            os.rmdir(here)


def _nested(tmp_path):
    outer = tmp_path / "outer"
    (outer / "inner").mkdir(parents=True)
    (outer / "top.py").write_text("def outer_function(x):\n    return inner_secret_token(x)\n")
    (outer / "inner" / "sec.py").write_text("def inner_secret_token(x):\n    return 'INNER_ONLY_9931' + x\n")
    return outer


def test_a_repository_added_inside_an_indexed_one_leaves_the_enclosing_index_at_once(tmp_path):
    outer = _nested(tmp_path)
    store = SqliteIndex()
    add_repository(store, outer, "outer", ["everyone"])
    add_repository(store, outer / "inner", "inner", ["secret"])
    got = Retriever().snippets_for_chat(groups=frozenset({"dev"}), repos=[], query="what does inner_secret_token return?")
    assert all("INNER_ONLY_9931" not in s.text for s in got)
    assert [s.repo for s in Retriever().snippets_for_chat(groups=frozenset({"secret"}), repos=["inner"],
                                                          query="inner_secret_token")] == ["inner"]  # fmt: skip
    assert update_repository(store, "outer").removed == 0  # already gone; its folder is refused from now on
    assert _paths(store) == ["sec.py", "top.py"]
    store.close()


def test_a_served_completion_never_returns_a_nested_repositorys_code_to_another_group(tmp_path, serve_process, random_gguf):
    outer = _nested(tmp_path)
    assert run_cli("index", "add", str(outer), "--name", "outer", "--groups", "everyone").returncode == 0
    assert run_cli("index", "add", str(outer / "inner"), "--name", "inner", "--groups", "secret").returncode == 0
    assert run_cli("users", "add", "carol", "--groups", "contractors").returncode == 0
    token = create_token("--name", "carol-editor", "--user", "carol")
    s = serve_process(["--model", str(random_gguf), "--model-id", "tiny"])
    body = {
        "model": "tiny",
        "max_tokens": 1,
        "temperature": 0,
        "prompt": "from inner.sec import inner_secret_token\n\ndef main(x):\n    return outer_function(x) + inner_secret_token(",
        "codemoat": {"repo": "outer", "path": "main.py", "return_snippets": True},
    }
    r = httpx.post(s.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert r.status_code == 200, r.text
    snippets = r.json()["codemoat"]["snippets"]
    assert any(sn["path"] == "top.py" for sn in snippets)  # retrieval works for this prompt
    assert "INNER_ONLY_9931" not in json.dumps(snippets)


def test_a_gitignore_of_many_rules_is_matched_by_a_few_regexes_whatever_their_order(tmp_path):
    """Was: each rule was matched through fnmatch, whose cache holds 32,768 patterns: past that every file compiled
    every rule anew, minutes for a hundred files under the index's write lock; and then a run of same-signed rules at
    a time, as slow when ignores and `!` rules alternate. Now per kind of rule (path or name, folders only or not)
    regexes of at most IGNORE_CHUNK rules, last first, whose first matching alternative is the last matching rule:
    the verdicts stay gitignore's."""
    from codemoat.index.walk import IGNORE_CHUNK, _Ignore

    repo = tmp_path / "repo"
    repo.mkdir()
    rules = [f"build_{i}_*.tmp" if i % 2 else f"!keep_{i}.py" for i in range(36_000)]  # alternating signs
    rules += ["ignored_*.py", "!ignored_but_kept.py", "/anchored_*.py", "logs/", "!ignored_*.py", "ignored_again.py"]
    (repo / ".gitignore").write_text("\n".join(rules) + "\n")
    for i in range(40):
        (repo / f"f{i}.py").write_text(f"def function_{i}():\n    return {i}\n")
    for name in ("ignored_x.py", "ignored_but_kept.py", "ignored_again.py", "anchored_1.py", "build_3_x.tmp.py"):
        (repo / name).write_text("X = 1\n")
    (repo / "logs").mkdir()
    (repo / "logs" / "run.py").write_text("Y = 1\n")
    kinds = _Ignore(None, "", rules)._kinds
    assert len(kinds) <= 4  # a regex list per kind of rule, not a regex per rule or per run of one sign
    # and at most IGNORE_CHUNK rules (groups) in one regex: a path no rule matches cost time in the number of groups
    # at each alternative, quadratic in one regex of every rule (a reviewer: 2.3 s a path at 99,000 rules)
    assert max(match.__self__.groups for _a, _d, chunks in kinds for match in chunks) <= IGNORE_CHUNK
    assert scan(repo).paths == sorted(
        [*(f"f{i}.py" for i in range(40)), "build_3_x.tmp.py", "ignored_but_kept.py", "ignored_x.py"]
    )


def test_gitignore_files_past_the_rule_budget_are_a_one_line_refusal(tmp_path, monkeypatch):
    """A committed tree of many folders, each with a 1 MB .gitignore, compiled every one: hours under the index's
    write lock. A walk compiles at most `MAX_IGNORE_RULES` rules; past them the repository is refused in one line."""
    from codemoat.index import walk

    monkeypatch.setattr(walk, "MAX_IGNORE_RULES", 50)
    repo = tmp_path / "repo"
    for d in ("a", "b"):
        (repo / d).mkdir(parents=True)
        (repo / d / ".gitignore").write_text("\n".join(f"x{i}_*" for i in range(30)) + "\n")
        (repo / d / "m.py").write_text("M = 1\n")
    with pytest.raises(CodemoatError, match=r"hold more than 50 rules \(the last read: b/.gitignore\): not indexed"):
        scan(repo)
    monkeypatch.setattr(walk, "MAX_IGNORE_RULES", 60)
    assert scan(repo).paths == ["a/m.py", "b/m.py"]


@git
def test_a_git_listing_that_fails_leaves_the_index_as_it_was(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for i in range(3):
        (repo / f"f{i}.py").write_text(f"def function_{i}():\n    return {i}\n")
    _git_add(repo)
    store = SqliteIndex()
    add_repository(store, repo, "repo", ["everyone"])
    (repo / ".git" / "index").write_bytes(b"DIRC\0\0\0\x02damaged")  # `git ls-files` fails; `rev-parse` does not
    with pytest.raises(CodemoatError, match=r"`git ls-files` failed in .*the index was left as it is"):
        update_repository(store, "repo")  # was: no files listed, so all three removed from the index
    assert _paths(store) == ["f0.py", "f1.py", "f2.py"]
    r = run_cli("index", "update", "repo")
    assert r.returncode != 0 and "Traceback" not in r.stderr and len((r.stdout + r.stderr).strip().splitlines()) == 1
    # `index update` of every repository names that one and still updates the others (it stopped at it: a reviewer)
    other = tmp_path / "zeta"  # after "repo": it was never reached
    other.mkdir()
    (other / "a.py").write_text("def a():\n    return 1\n")
    add_repository(store, other, "zeta", ["everyone"])
    (other / "b.py").write_text("def b():\n    return 2\n")
    r = run_cli("index", "update")
    assert r.returncode == 1 and "error: repo: `git ls-files` failed" in r.stderr and "zeta" in r.stdout, (r.stdout, r.stderr)
    assert run_cli("retrieve", "--repo", "zeta", "--path", "b.py", "--line", "1", "--json").returncode == 0
    assert "b.py" in _paths(store)
    store.close()


@pytest.mark.parametrize("kind", [pytest.param("git", marks=git), "plain"])
def test_dotenv_files_are_never_indexed_or_retrieved(tmp_path, kind):
    """Was: `env` was a text extension, so a committed `.env` (or `prod.env`) was indexed and its keys retrieved into
    completions for everyone who reads the repository. Dotenv files are now never indexed; code that reads the same
    names is, and so is the rest of the repository."""
    repo = tmp_path / "repo"
    (repo / "deploy").mkdir(parents=True)
    key = "AKIAIOSFODNN7EXAMPLE"
    for name in (".env", ".env.production", "deploy/prod.env"):
        (repo / name).write_text(f"AWS_ACCESS_KEY_ID={key}\nDATABASE_URL=postgres://u:pw@db/app\n")
    (repo / "settings.py").write_text("import os\n\nAWS_ACCESS_KEY_ID = os.environ['AWS_ACCESS_KEY_ID']\n")
    (repo / "config.toml").write_text("[aws]\nregion = 'eu-west-1'\n")
    if kind == "git":
        _git_add(repo)
    store = SqliteIndex()
    add_repository(store, repo, "repo", ["everyone"])
    assert _paths(store) == ["config.toml", "settings.py"]
    assert key not in json.dumps([r for r in store.db.execute("SELECT * FROM chunks")], default=str)
    store.close()
    snippets = Retriever().snippets_for_completion(
        groups=frozenset({"everyone"}),
        repo="repo",
        path="app.py",
        prefix="AWS_ACCESS_KEY_ID = ",
        suffix="",
        k=5,
        budget_tokens=512,
    )
    assert snippets and not any(key in s.text for s in snippets), [s.text for s in snippets]


def test_a_file_name_with_a_zero_width_character_is_refused_like_a_control_character(tmp_path):
    """A second reviewer: the index refused names with control characters and bidi overrides, the knowledge-pack
    reader also zero-width ones (`pay\\u200bments.py` shows as `payments.py`); now one rule for both
    (`codemoat.text.unsafe_name`). Model text keeps its zero-width joiners: only names are refused."""
    from codemoat.text import shown, unsafe_name

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "payments.py").write_text(OK)
    (repo / "pay\u200bments.py").write_text("def steal():\n    return 1\n")
    store = SqliteIndex()
    stats = add_repository(store, repo, "repo", ["everyone"])
    assert _paths(store) == ["payments.py"]
    assert list(stats.refused.values()) == ["file name has control characters (never read)"]
    store.close()
    assert unsafe_name("a\ufeffb") and not unsafe_name("café.py") and shown("👩\u200d💻") == "👩\u200d💻"


def test_gitignore_double_star_forms_hide_what_git_hides_in_a_plain_folder(tmp_path):
    """A second reviewer, comparing with `git check-ignore --no-index`: `**/secrets/` did not hide a top-level
    `secrets/`, nor `a/**/b.py` an `a/b.py`, nor `docs/**/*.md` a `docs/r.md` (fnmatch read `**/` literally), so a
    plain folder's owner's hidden files were indexed. In a git work tree `git ls-files` decides, as before."""
    repo = tmp_path / "repo"
    for rel in ("secrets/k.py", "x/secrets/k.py", "a/b.py", "a/q/b.py", "docs/r.md", "docs/x/r.md", "keep.py", "docs/x/r.py"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("K = 1\n")
    (repo / "#notes.md").write_text("private\n")  # hidden by an escaped "#", as git reads it
    (repo / ".gitignore").write_text("**/secrets/\na/**/b.py\ndocs/**/*.md\n\\#notes.md\n")
    assert scan(repo).paths == ["docs/x/r.py", "keep.py"]
