"""`--json` is the flag only where click reads it as the flag: given as another option's value (`tokens create
--name --json` names a token "--json") or after `--`, a failure is the one stderr line the user asked for, not JSON
on stdout. Read against the app's real commands, so an option added later is read as click reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from conftest import run_cli

from codemoat.cli.common import asks_for_json
from codemoat.cli.main import app


@pytest.fixture(scope="module")
def command():
    return typer.main.get_command(app)


@pytest.mark.parametrize(
    "args",
    [
        ["tokens", "create", "--name", "x", "--json"],
        ["tokens", "create", "--json", "--name", "x"],
        ["tokens", "create", "--name=x", "--json"],
        ["tokens", "create", "--name", "--json", "--json"],  # the second one is the flag
        ["config", "show", "--jsn", "--json"],  # a usage error before it: still JSON
        ["--json"],
    ],
)
def test_the_flag_is_read(command, args):
    assert asks_for_json(args, command)


@pytest.mark.parametrize(
    "args",
    [
        ["tokens", "create", "--name", "--json"],
        ["tokens", "create", "--expires", "--json", "--name", "x"],
        ["tokens", "create", "--name=--json"],
        ["users", "add", "--", "--json"],
        ["audit", "export", "-o", "--json"],  # a short option's value
        ["tokens", "create", "--name", "x"],
    ],
)
def test_a_value_or_an_argument_is_not_the_flag(command, args):
    assert not asks_for_json(args, command)


def _env(tmp_path: Path) -> dict:
    return {"CODEMOAT_DATABASE_URL": f"sqlite:///{tmp_path}/nosuch/x.db", "CODEMOAT_HOME": str(tmp_path / "home")}


def test_json_as_an_options_value_fails_as_text(tmp_path: Path):
    p = run_cli("tokens", "create", "--name", "--json", env=_env(tmp_path))
    assert p.returncode == 1 and p.stdout == "", p.stdout
    assert p.stderr.startswith("error: database ") and len(p.stderr.splitlines()) == 1, p.stderr


def test_json_as_the_flag_fails_as_json(tmp_path: Path):
    """The positive beside it: the same failure, `--json` the flag, is the JSON object."""
    p = run_cli("tokens", "create", "--name", "x", "--json", env=_env(tmp_path))
    got = json.loads(p.stdout)
    assert p.returncode == 1 and got["ok"] is False and got["code"] == 1 and got["error"].startswith("database ")
