"""`--json` on a failure: every command that has `--json` tells a failure to a script as JSON on stdout,
`{"ok": false, "error": "<the line>", "code": <exit status>}`, beside the one `error:` line on stderr for people, and exits
non-zero. The commands are walked from the typer app, so a command added later is held to it too."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_errors import one_line_error
from conftest import run_cli
from ports import free_port

# Values for a command's required parameters that make it fail early, and never reach off this machine
_PATHS = {"file", "model", "license", "out", "corpus", "archive", "ca", "activation", "challenge_file", "suspect"}
_PATHS |= {"moat", "files", "path", "repos"}


def _json_commands() -> list[tuple[list[str], list]]:
    import typer

    from codemoat.cli.main import app

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in sorted(cmd.commands.items()):
                yield from walk(sub, [*path, name])
        else:
            yield path, cmd

    out = []
    for path, cmd in walk(typer.main.get_command(app), []):
        if any("--json" in getattr(p, "opts", ()) for p in cmd.params):
            out.append((path, [p for p in cmd.params if p.required]))
    return out


def _failing_args(path: list[str], required: list, missing: Path, port: int, a_file: Path) -> list[str]:
    args = list(path)
    fixed = {"line": "1", "expires": "30d", "version": "1.0.0", "server": f"http://127.0.0.1:{port}", "vendor": str(a_file)}
    for p in required:
        value = fixed.get(p.name)
        if value is None:
            value = str(missing / p.name) if p.name in _PATHS else "x"
        args += [value] if p.param_type_name == "argument" else [p.opts[0], value]
    return [*args, "--json"]


def _json_error(p: subprocess.CompletedProcess) -> dict:
    """The failure's JSON object: stdout is that one object, its code the exit status, its error the stderr line's."""
    assert p.returncode != 0, (p.args, p.stdout, p.stderr)
    line = one_line_error(p, code=p.returncode)
    got = json.loads(p.stdout)
    assert set(got) == {"ok", "error", "code"} and got["ok"] is False and got["code"] == p.returncode, got
    assert got["error"] and line.endswith(got["error"]), (line, got)
    return got


def test_every_json_command_fails_as_json(home: Path, tmp_path: Path):
    commands = _json_commands()
    assert len(commands) > 40  # the walk found the app's commands
    missing = tmp_path / "nosuch"  # never created: every path a command is given is missing
    a_file = tmp_path / "a-file"  # the data folder and the vendor's folder: a file, not a folder
    a_file.write_text("not a folder\n")
    env = {
        "CODEMOAT_HOME": str(a_file),
        "CODEMOAT_CONFIG": str(missing / "codemoat.toml"),
        "CODEMOAT_DATABASE_URL": f"sqlite:///{missing}/db/x.db",
    }
    port = free_port()  # nothing listens: `login --server` is refused on this machine

    def one(item):
        path, required = item
        return path, run_cli(*_failing_args(path, required, missing, port, a_file), env=env)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, commands))
    for path, p in results:
        _json_error(p)
    assert not missing.exists()  # nothing was made for a path that was not there


def test_usage_errors_with_json_are_json():
    got = _json_error(run_cli("config", "show", "--jsn", "--json"))
    assert got["code"] == 2 and "No such option: --jsn" in got["error"]
    got = _json_error(run_cli("tokens", "create", "--json"))
    assert got["code"] == 2 and "Missing option '--name'" in got["error"]
    # `--json` after `--` is an argument, not the flag: the failure is the line on stderr alone
    p = run_cli("users", "add", "--", "--json")
    one_line_error(p, "invalid user name")
    assert p.stdout == ""


@pytest.mark.parametrize("args", [("users", "list"), ("config", "show", "--jsn")])
def test_without_json_stdout_stays_empty(args, tmp_path: Path):
    """The negative: no `--json`, no JSON; the one line on stderr is the whole of the failure."""
    p = run_cli(*args, env={"CODEMOAT_DATABASE_URL": f"sqlite:///{tmp_path}/nosuch/x.db"})
    assert p.returncode != 0 and p.stdout == "", p.stdout
    one_line_error(p, code=p.returncode)


def test_verify_fails_as_json(tmp_path: Path):
    _json_error(run_cli("verify", "--model", str(tmp_path / "m.moat"), "--license", str(tmp_path / "l.lic"), "--json"))
