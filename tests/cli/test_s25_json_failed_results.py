"""Commands whose result is itself the failure (audit verify's report of a bad record, index update with a repository
that could not be read, update apply/rollback that a running server could not serve) exited 1 through a bare
`typer.Exit` after writing their result: under `--json` a script found no `error` and, for index update, nothing
at all on stderr. Now the result stays the one document and a dict result also says `ok: false`, `error`, `code`
(`common.emit_failed`); a list result keeps its shape and the line is on stderr."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import typer
from conftest import run_cli

from codemoat.cli import common

git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


@pytest.fixture
def tampered_log(home: Path) -> Path:
    from codemoat.audit.log import AuditLog, head_file_for
    from codemoat.db import open_db

    url = f"sqlite:///{home / 'codemoat.db'}"
    engine = open_db(url)
    log = AuditLog(engine, checkpoint_every=10, head_file=head_file_for(url, home))
    for i in range(12):
        log.append(user="alice", token_id="tok_1", route="/v1/completions", protocol="openai", status=200, completion_tokens=i)
    engine.dispose()
    con = sqlite3.connect(home / "codemoat.db")
    con.execute("UPDATE audit_records SET user = 'mallory' WHERE seq = 5")
    con.commit()
    con.close()
    return home


def test_audit_verify_json_failure_says_the_error(tampered_log):
    p = run_cli("audit", "verify", "--json")
    got = json.loads(p.stdout)  # one document
    assert p.returncode == 1 and got["ok"] is False and got["code"] == 1 and got["first_bad"] == 5, got
    assert got["error"].startswith("audit log FAILED at record 5: "), got


def test_audit_verify_without_json_is_the_report_for_people(tampered_log):
    p = run_cli("audit", "verify")
    assert p.returncode == 1 and "FAILED at record 5" in p.stdout and "{" not in p.stdout, p.stdout


def test_audit_verify_json_that_passes_has_no_error(home: Path):
    run_cli("tokens", "list")  # the database made
    p = run_cli("audit", "verify", "--json")
    got = json.loads(p.stdout)
    assert p.returncode == 0 and got["ok"] is True and "error" not in got, (got, p.stderr)


@git
def test_index_update_json_names_the_repository_that_failed(home: Path, tmp_path: Path):
    repos = {}
    for name in ("broken", "fine"):
        repo = repos[name] = tmp_path / name
        repo.mkdir()
        (repo / "a.py").write_text("def a():\n    return 1\n")
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
        assert run_cli("index", "add", str(repo), "--name", name).returncode == 0
    (repos["broken"] / ".git" / "index").write_bytes(b"DIRC\0\0\0\x02damaged")  # `git ls-files` fails
    p = run_cli("index", "update", "--json")
    rows = json.loads(p.stdout)  # the list, as before: one entry a repository
    assert p.returncode == 1 and [r["repo"] for r in rows] == ["broken", "fine"] and "error" in rows[0], rows
    assert p.stderr == "error: 1 of 2 repositories not updated: broken\n", p.stderr  # was: nothing
    fine = run_cli("index", "update", "fine", "--json")  # the negative: no failure, no line
    assert fine.returncode == 0 and fine.stderr == "" and json.loads(fine.stdout)[0]["repo"] == "fine"


@pytest.fixture
def json_cli(monkeypatch):
    monkeypatch.setattr(common, "json_errors", True)
    monkeypatch.setattr(common, "json_written", False)


def test_a_failed_dict_result_carries_the_error(json_cli, capsys):
    """update apply/rollback's shape: their failing servers cannot be made here without a model, so the helper they
    call is held to it directly."""
    served = {"version": "2", "served": [{"pid": 7, "ok": False, "error": "its check failed"}]}
    with pytest.raises(typer.Exit) as e:
        common.emit_failed(served, True, None, "server pid 7 could not serve it: its check failed")
    out, err = capsys.readouterr()
    assert e.value.exit_code == 1 and err == ""
    assert json.loads(out) == {**served, "ok": False, "error": "server pid 7 could not serve it: its check failed", "code": 1}


def test_a_failed_result_for_people_is_the_human_text(json_cli, capsys):
    with pytest.raises(typer.Exit):
        common.emit_failed({"a": 1}, False, lambda d: print("told", d["a"]), "x")
    out, _ = capsys.readouterr()
    assert out == "told 1\n"
