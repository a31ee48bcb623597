"""Directory sync against a real slapd, on SQLite and PostgreSQL: users and groups mirror the
directory, a user removed or disabled there loses every token and group at the next sync, every
change is audited, and a directory that stays unreachable fails closed."""

from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa

from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.db import open_db
from codemoat.directory.service import DirectoryKeeper
from codemoat.directory.sync import directory_state, directory_users, managed_users
from codemoat.errors import Unauthorized
from conftest import run_cli


@pytest.fixture
def keeper(dir_settings, database_url):
    from codemoat.audit.log import AuditLog

    engine = open_db(database_url)
    k = DirectoryKeeper(Settings(directory=dir_settings), engine, audit=AuditLog(engine))
    yield k
    k.directory.close()
    engine.dispose()


def _groups(acc: Accounts, user: str) -> set[str]:
    return set(acc.groups_of(user)) - {"everyone"}


def _audit_actions(engine) -> list[tuple[str, str]]:
    with engine.connect() as c:
        rows = c.execute(sa.text("select \"user\", detail from audit_records where kind = 'directory' order by seq")).all()
    return [(u, json.loads(d)["action"]) for u, d in rows]


def test_first_sync_mirrors_users_and_mapped_groups(keeper):
    rep = keeper.sync()
    acc = keeper.accounts
    assert sorted(rep.added) == ["alice", "bob", "dave"]  # carol is disabled in the directory
    assert _groups(acc, "alice") == {"payments", "engineering"}
    assert _groups(acc, "bob") == {"engineering", "web", "admins"}
    assert _groups(acc, "dave") == set()
    assert ("alice", "added") in _audit_actions(keeper.engine)
    again = keeper.sync()
    assert again.changes == 0 and again.unchanged == 3


def test_dry_run_changes_nothing(keeper):
    rep = keeper.sync(dry_run=True)
    assert rep.dry_run and sorted(rep.added) == ["alice", "bob", "dave"]
    assert [u["name"] for u in keeper.accounts.list_users()] == []
    assert _audit_actions(keeper.engine) == []


def test_removed_from_a_group_loses_it_at_the_next_sync(keeper, company):
    keeper.sync()
    company.modify("cn=payments-devs,ou=groups,dc=example,dc=com", {"member": [("MODIFY_REPLACE", [company.people["dave"]])]})
    rep = keeper.sync()
    assert rep.updated["alice"] == {"from": ["engineering", "payments"], "to": []}  # engineering came through payments-devs
    assert _groups(keeper.accounts, "alice") == set()
    assert _groups(keeper.accounts, "dave") == {"payments", "engineering"}


def test_user_gone_or_disabled_loses_every_token_at_once(keeper, company):
    keeper.sync()
    acc = keeper.accounts
    _, bob_token = acc.create_token("bob-laptop", user="bob")
    _, dave_token = acc.create_token("dave-laptop", user="dave")
    acc.add_user("hand-made", ["payments"])  # never in the directory: left alone
    _, hand_token = acc.create_token("hand", user="hand-made")
    company.delete(company.people["bob"].replace("uid=bob", "uid=bob"))
    company.modify(company.people["dave"], {"employeeType": [("MODIFY_REPLACE", ["disabled"])]})
    rep = keeper.sync()
    assert sorted(rep.disabled) == ["bob", "dave"]
    for t in (bob_token, dave_token):
        with pytest.raises(Unauthorized):
            acc.authenticate(t)
    assert _groups(acc, "bob") == set()
    assert acc.authenticate(hand_token).user == "hand-made" and _groups(acc, "hand-made") == {"payments"}
    assert ("bob", "disabled") in _audit_actions(keeper.engine)
    # re-enabled in the directory: groups come back at the next sync (tokens stay revoked)
    company.modify(company.people["dave"], {"employeeType": [("MODIFY_DELETE", [])]})
    rep = keeper.sync()
    assert rep.enabled == ["dave"]
    with pytest.raises(Unauthorized):
        acc.authenticate(dave_token)


def test_login_mints_a_scoped_expiring_token(keeper):
    secret, info = keeper.login("bob", "bob-pw-2")
    p = keeper.accounts.authenticate(secret)
    assert p.user == "bob" and "admin" in p.scopes and {"web", "admins"} <= p.groups
    assert info["expires_at"] - time.time() == pytest.approx(30 * 86400, abs=120)
    secret, info = keeper.login("alice", "alice-pw-1")
    assert "admin" not in keeper.accounts.authenticate(secret).scopes
    with pytest.raises(Unauthorized):
        keeper.login("alice", "wrong")


def test_unreachable_directory_fails_closed_after_max_staleness(keeper, company):
    keeper.sync()
    _, token = keeper.accounts.create_token("alice-laptop", user="alice")
    keeper.accounts.add_user("hand-made")
    _, hand = keeper.accounts.create_token("hand", user="hand-made")
    company.stop()
    from codemoat.directory import DirectoryUnavailable

    with pytest.raises(DirectoryUnavailable):
        keeper.sync()
    p = keeper.accounts.authenticate(token)
    keeper.gate(p)  # within max_staleness: last-known groups still hold
    assert _groups(keeper.accounts, "alice") == {"payments", "engineering"}
    old = time.time() - keeper.cfg.max_staleness_s - 5
    with keeper.engine.begin() as c:  # the directory last vouched for alice longer ago than max_staleness_s
        c.execute(directory_state.update().values(last_success=old))
        c.execute(directory_users.update().values(synced_at=old))
    keeper._managed = managed_users(keeper.engine)
    with pytest.raises(Unauthorized, match="fail closed"):
        keeper.gate(p)
    keeper.gate(keeper.accounts.authenticate(hand))  # users made by hand do not depend on the directory
    assert ("", "sync_failed") in [(u or "", a) for u, a in _audit_actions(keeper.engine)]


def test_cli_sync_is_one_line_when_unreachable(dir_settings, tmp_path, company):
    cfg = tmp_path / "codemoat.toml"
    cfg.write_text(
        "[directory]\n"
        + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in dir_settings.model_dump().items() if v is not None and not isinstance(v, dict)
        )
        + "[directory.group_map]\n"
        + "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in dir_settings.group_map.items())
    )
    r = run_cli("directory", "sync", "--json", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(r.stdout)["added"]) == ["alice", "bob", "dave"]
    r = run_cli("directory", "sync", "--dry-run", "--config", str(cfg))
    assert r.returncode == 0 and "0 would change" in r.stdout
    company.stop()
    r = run_cli("directory", "sync", "--config", str(cfg))
    assert r.returncode == 1 and "unreachable" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_token_made_later_for_a_user_the_directory_disabled_does_not_sign_in(keeper, company):
    """The directory disabled bob: sync revoked his tokens and marked him disabled, and the console already
    refused a disabled user's session. But a token made for him afterwards (`tokens create --user bob`, the
    console's or the admin API's form: create_token does not look) authenticated on every API route, and
    no later sync revoked it (an already disabled user is skipped): the directory's cut-off undone for good."""
    keeper.sync()
    acc = keeper.accounts
    company.delete(company.people["bob"])
    assert keeper.sync().disabled == ["bob"]
    _, late = acc.create_token("bob-late", user="bob")
    keeper.sync()
    with pytest.raises(Unauthorized, match="disabled"):
        acc.authenticate(late)


def test_mirrored_group_names_follow_the_one_rule_for_names():
    """A directory group mirrors (no group_map) exactly when codemoat.names would accept it anywhere else: `eng@corp`
    was skipped here although `users add --groups` and `index add --groups` take it, so a directory's group could
    never be given a repository; `everyone`/`admin` stay refused (anyone may make a group of that name)."""
    from codemoat.config import DirectorySettings
    from codemoat.directory.sync import mapped_groups
    from codemoat.names import valid_name

    names = ["eng@corp", "web", "a.b_c-d", "_lead", "-x", "two words", "eng\n", "é", "x" * 128, "x" * 129, "everyone", "admin"]
    skipped: set[str] = set()
    got = mapped_groups(frozenset(names), DirectorySettings(), skipped)
    assert "eng@corp" in got
    assert set(got) == {n for n in names if valid_name(n)} - {"everyone", "admin"}
    assert skipped == set(names) - set(got)


@pytest.mark.parametrize("where", ["group_map", "admin_groups"])
def test_a_codemoat_group_named_in_the_directory_settings_follows_the_rule_for_names(where, tmp_path):
    """group_map's targets and admin_groups are codemoat groups: `eng corp` was taken, sync made that group, and
    `index add --groups` refuses it, so no repository could ever be given to it. Refused when the settings are
    read (one line through the CLI); a valid name such as eng@corp is taken."""
    from pydantic import ValidationError

    from codemoat.config import DirectorySettings

    bad = {"group_map": {"cn=eng": "eng corp"}} if where == "group_map" else {"admin_groups": ["ops\n"]}
    with pytest.raises(ValidationError, match=f"directory.{where} names the codemoat group"):
        DirectorySettings(**bad)
    good = {"group_map": {"cn=eng": "eng@corp"}} if where == "group_map" else {"admin_groups": ["ops@corp", "admin"]}
    assert DirectorySettings(**good)
    cfg = tmp_path / "codemoat.toml"
    cfg.write_text(
        '[directory]\ngroup_map = { "cn=eng" = "eng corp" }\n'
        if where == "group_map"
        else '[directory]\nadmin_groups = ["a b"]\n'
    )
    r = run_cli("config", "show", env={"CODEMOAT_CONFIG": str(cfg)})
    assert r.returncode != 0 and "names the codemoat group" in r.stderr and "Traceback" not in r.stderr, r.stderr
