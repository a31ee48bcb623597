"""Accounts: users, groups, hashed tokens with scopes and expiry."""

import time

import pytest
import sqlalchemy as sa

from codemoat.accounts import EVERYONE, Accounts
from codemoat.db import open_db
from codemoat.errors import CodemoatError, NotFound, Unauthorized


@pytest.fixture
def acc(database_url):
    """Every accounts test runs on SQLite and on PostgreSQL (tests/conftest.py: database_url)."""
    eng = open_db(database_url)
    yield Accounts(eng)
    eng.dispose()


def test_token_round_trip_and_only_hash_stored(acc, home):
    info, secret = acc.create_token("alice", scopes=("complete",))
    p = acc.authenticate(secret)
    assert (p.user, p.token_id, p.scopes) == ("alice", info.id, frozenset({"complete"}))
    assert EVERYONE in p.groups
    with acc.engine.connect() as c:
        dump = "\n".join(map(str, c.execute(sa.text("select * from tokens")).all()))
    assert secret not in dump
    if acc.engine.url.get_backend_name() == "sqlite":
        assert secret.encode() not in (home / "codemoat.db").read_bytes()


@pytest.mark.parametrize("bad", [None, "", "cm_wrong", "x" * 500])
def test_bad_tokens(acc, bad):
    acc.create_token("alice")
    with pytest.raises(Unauthorized):
        acc.authenticate(bad)


def test_revoke_and_expiry(acc):
    info, secret = acc.create_token("alice")
    acc.revoke_token(info.id)
    with pytest.raises(Unauthorized, match="revoked"):
        acc.authenticate(secret)
    with pytest.raises(NotFound):
        acc.revoke_token(info.id)
    info2, s2 = acc.create_token("bob", expires_at=time.time() + 2)  # a loaded CI gets to the next line in time
    assert acc.authenticate(s2).user == "bob"
    time.sleep(max(0.0, info2.expires_at - time.time()) + 0.05)  # the token's life runs out (time, not a wait)
    with pytest.raises(Unauthorized, match="expired"):
        acc.authenticate(s2)
    with pytest.raises(CodemoatError, match="future"):
        acc.create_token("x", expires_at=time.time() - 1)


def test_a_token_named_like_another_tokens_id_cannot_shield_it(acc):
    """Was: `revoke_token` matched an id or a name and refused when two active tokens matched, and a token's name is
    its maker's (`codemoat login --name`): one named like another token's id made that token unrevocable by id
    (`codemoat tokens revoke ID`: "2 active tokens are named ..."). An id now names its token; a name still
    revokes the one token it names, and two tokens of one name are still refused."""
    target, secret = acc.create_token("laptop", user="dev")
    shield, shield_secret = acc.create_token(target.id, user="dev")
    assert acc.revoke_token(target.id).id == target.id
    with pytest.raises(Unauthorized, match="revoked"):
        acc.authenticate(secret)
    assert acc.authenticate(shield_secret).token_id == shield.id
    acc.create_token("twin", user="dev")
    acc.create_token("twin", user="dev")
    with pytest.raises(CodemoatError, match="2 active tokens are named 'twin'"):
        acc.revoke_token("twin")
    assert acc.revoke_token(target.id).id == shield.id  # now the only active token answering to that text: its name


def test_a_nul_in_a_user_name_is_a_refusal_on_every_database(acc):
    """Was, on PostgreSQL (which refuses a NUL in any text it is sent): `set_groups`, `remove_user` and `create_token`
    for a user name holding one sent it to the database first, and its DataError was a 500."""
    acc.add_user("alice")
    for call in (lambda: acc.set_groups("ali\x00ce", ["web"]), lambda: acc.remove_user("ali\x00ce")):
        with pytest.raises(NotFound):
            call()
    with pytest.raises(CodemoatError, match="invalid user name"):
        acc.create_token("laptop", user="ali\x00ce")
    assert [u["name"] for u in acc.list_users()] == ["alice"]


def test_groups(acc):
    acc.add_user("alice", ["payments", "platform"])
    info, secret = acc.create_token("alice-laptop", user="alice")
    assert acc.authenticate(secret).groups == {"payments", "platform", EVERYONE}
    acc.set_groups("alice", ["web"])
    assert acc.authenticate(secret).groups == {"web", EVERYONE}
    assert {g["name"] for g in acc.list_groups()} >= {"payments", "web"}
    with pytest.raises(CodemoatError, match="already exists"):
        acc.add_user("alice")
    with pytest.raises(CodemoatError, match="invalid user name"):
        acc.add_user("bad name; drop table")
    for name in ("alice\n", "bob\n"):  # was accepted (`$` matches before a final newline): a second "alice"
        with pytest.raises(CodemoatError, match="invalid user name"):
            acc.add_user(name)
    with pytest.raises(CodemoatError, match="invalid token name"):
        acc.create_token("laptop\n", user="alice")
    with pytest.raises(CodemoatError, match="unknown scope"):
        acc.create_token("t", scopes=("root",))
    acc.remove_user("alice")
    with pytest.raises(Unauthorized):
        acc.authenticate(secret)
