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


def test_tokens_users_and_groups_go_to_the_database_the_configuration_names(tmp_path):
    """Was (an outside tester): `tokens`, `users` and `groups` read only the environment for the database, so with
    `database_url` in the TOML file (CODEMOAT_CONFIG) a token went to the home's database while `codemoat serve`
    authenticated against the configured one: the token never worked. And a malformed configuration went unnoticed.
    Now they open the configured database, and a broken configuration is a one-line error. The negative: without a
    `database_url` the home's database is used, as before."""
    import sqlalchemy as sa

    shared = tmp_path / "shared.db"
    cfg = tmp_path / "codemoat.toml"
    cfg.write_text(f'database_url = "sqlite:///{shared}"\n')
    env = {"CODEMOAT_CONFIG": str(cfg)}
    for args in (("tokens", "create", "--name", "alice", "--json"), ("users", "add", "bob"), ("groups", "add", "web")):
        r = run_cli(*args, env=env)
        assert r.returncode == 0, r.stderr
    with sa.create_engine(f"sqlite:///{shared}").connect() as c:
        assert c.execute(sa.text("SELECT COUNT(*) FROM tokens")).scalar() == 1
    assert [u["name"] for u in json.loads(run_cli("users", "list", "--json", env=env).stdout)] == ["alice", "bob"]
    assert json.loads(run_cli("tokens", "list", "--json").stdout) == []  # the home's database has none
    cfg.write_text("database_url = [\n")
    r = run_cli("tokens", "list", env=env)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
