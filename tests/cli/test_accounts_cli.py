"""The accounts CLI as a user runs it: JSON output, one-line errors."""

import json

from conftest import run_cli


def test_tokens_cli_round_trip():
    r = run_cli("tokens", "create", "--name", "ci", "--scopes", "complete", "--expires", "30d", "--json")
    assert r.returncode == 0, r.stderr
    tok = json.loads(r.stdout)
    assert tok["token"].startswith("cm_") and tok["scopes"] == ["complete"]
    listed = json.loads(run_cli("tokens", "list", "--json").stdout)
    assert listed[0]["id"] == tok["id"] and "token" not in listed[0] and listed[0]["active"]
    assert tok["token"] not in run_cli("tokens", "list").stdout
    r = run_cli("tokens", "revoke", tok["id"])
    assert r.returncode == 0
    assert json.loads(run_cli("tokens", "list", "--json").stdout)[0]["revoked"] is True


def test_users_and_groups_cli():
    assert run_cli("users", "add", "alice", "--groups", "payments,web").returncode == 0
    users = json.loads(run_cli("users", "list", "--json").stdout)
    assert users == [{"name": "alice", "groups": ["payments", "web"], "created_at": users[0]["created_at"]}]
    groups = {g["name"]: g["members"] for g in json.loads(run_cli("groups", "list", "--json").stdout)}
    assert groups["payments"] == ["alice"]


def test_errors_are_one_line_and_nonzero():
    for args, needle in [
        (("tokens", "revoke", "tok_missing"), "no active token"),
        (("tokens", "create", "--name", "x", "--scopes", "root"), "unknown scope"),
        (("tokens", "create", "--name", "x", "--expires", "soonish"), "invalid duration"),
        (("users", "add", "bad name!"), "invalid user name"),
        (("users", "remove", "ghost"), "no user"),
    ]:
        r = run_cli(*args)
        assert r.returncode == 1, args
        assert needle in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
