"""`codemoat index …` and `codemoat retrieve` as a user runs them (subprocesses, real index)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli

DEMO = Path(__file__).resolve().parents[2] / "demo" / "repo"


def test_index_lifecycle_and_retrieve():
    r = run_cli("index", "add", str(DEMO), "--name", "payments", "--groups", "payments,finance", "--json")
    assert r.returncode == 0, r.stderr
    added = json.loads(r.stdout)
    assert added["indexed"] >= 5 and added["groups"] == ["finance", "payments"]

    listed = json.loads(run_cli("index", "list", "--json").stdout)
    assert [(d["name"], d["groups"]) for d in listed] == [("payments", ["finance", "payments"])]
    assert listed[0]["symbols"] > 5

    args = ["retrieve", "--repo", "payments", "--path", "payments/checkout.py", "--line", "15", "--column", "16", "--json"]
    got = json.loads(run_cli(*args, "--groups", "payments").stdout)
    assert any(s["path"] == "payments/fees.py" and "def interchange_fee" in s["text"] for s in got)
    assert all(s["path"] != "payments/checkout.py" for s in got)
    assert set(got[0]) == {"repo", "path", "start_line", "end_line", "score", "text", "id"}
    assert json.loads(run_cli(*args, "--groups", "contractors").stdout) == []  # not in the repo's groups

    r = run_cli("index", "update", "payments", "--groups", "contractors", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["groups"] == ["contractors"]
    assert json.loads(run_cli(*args, "--groups", "contractors").stdout) != []
    assert json.loads(run_cli(*args, "--groups", "payments").stdout) == []

    assert run_cli("index", "remove", "payments").returncode == 0
    assert json.loads(run_cli("index", "list", "--json").stdout) == []


def test_user_errors_print_one_line_and_exit_nonzero(tmp_path):
    for args in (
        ["index", "add", str(tmp_path / "missing"), "--name", "x"],
        ["index", "remove", "nope"],
        ["index", "update", "nope"],
        ["retrieve", "--repo", "nope", "--path", "a.py", "--line", "1"],
    ):
        r = run_cli(*args)
        assert r.returncode == 1, args
        assert r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_an_index_path_naming_another_file_is_said_and_the_file_left_alone(tmp_path):
    """index.path pointing at a file that is not an index (a typo naming the wrong file): one line naming it, the
    file untouched (it was "DatabaseError: file is not a database", the generic fallback)."""
    other = tmp_path / "notes.txt"
    other.write_bytes(b"not an index, keep me\n" * 10)
    other.chmod(0o644)  # /etc/passwd, say: its mode is not changed either
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.py").write_text("def f():\n    return 1\n")
    env = {"CODEMOAT_INDEX_PATH": str(other)}
    for args in (["index", "list"], ["index", "add", str(repo), "--name", "r"]):
        r = run_cli(*args, env=env)
        assert r.returncode == 1 and "Traceback" not in r.stderr, (args, r.stderr)
        assert r.stderr.strip().splitlines() == [
            f"error: {other} is not a codemoat index, or it is corrupted (not a SQLite file); "
            "it was left as it is (index.path names the index file)"
        ], r.stderr
    assert other.read_bytes() == b"not an index, keep me\n" * 10 and other.stat().st_mode & 0o777 == 0o644
    damaged = tmp_path / "damaged.db"  # a SQLite header, then garbage: SQLite's own word
    damaged.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    r = run_cli("index", "list", env={"CODEMOAT_INDEX_PATH": str(damaged)})
    assert r.returncode == 1 and "is not a codemoat index, or it is corrupted (SQLite: " in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
