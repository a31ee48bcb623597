"""Review of 013487c (`--json` failures on stdout): what scripts already parsing `--json` output rely on.

Was broken: (1) a command that had already written its JSON result and then failed (`login --json`: the token,
shown once, then "not kept" when the login file could not be saved) wrote a second JSON document after it, so a
script's `json.loads(stdout)` failed and the token in it was lost to the script; (2) `verify --json` had answered a
refusal with `{"ok": false, "error"}` and now said `{"error", "code"}`: a script reading `ok` broke.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from cli_errors import one_line_error
from conftest import run_cli

from codemoat.cli import common


@pytest.fixture
def json_cli(monkeypatch):
    """`common` as `main` leaves it for a command line with `--json`."""
    monkeypatch.setattr(common, "json_errors", True)
    monkeypatch.setattr(common, "json_written", False)


def test_a_failure_after_the_json_result_leaves_stdout_one_document(json_cli, capsys):
    body = {"token": "cm_shown_once", "saved_to": None}
    common.emit(body, True)
    with pytest.raises(typer.Exit) as e:
        common.fail("cannot save the login file: the token above is not kept")
    assert e.value.exit_code == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == body  # one document, the result: the token is still there for the script
    assert "error: cannot save the login file" in err  # the failure is the stderr line and the exit status


def test_a_failure_before_any_result_is_the_json_error(json_cli, capsys):
    """The negative beside it: with no result written, the failure is the one document on stdout."""
    with pytest.raises(typer.Exit):
        common.fail("no such file", 3)
    out, _ = capsys.readouterr()
    assert json.loads(out) == {"ok": False, "error": "no such file", "code": 3}


def test_verify_json_refusal_still_says_ok_false(tmp_path: Path):
    p = run_cli("verify", "--model", str(tmp_path / "m.moat"), "--license", str(tmp_path / "l.lic"), "--json")
    got = json.loads(p.stdout)
    assert p.returncode == 1 and got["ok"] is False and got["error"]
    one_line_error(p)


def test_verify_without_json_prints_nothing_on_stdout(tmp_path: Path):
    p = run_cli("verify", "--model", str(tmp_path / "m.moat"), "--license", str(tmp_path / "l.lic"))
    assert p.returncode == 1 and p.stdout == ""
