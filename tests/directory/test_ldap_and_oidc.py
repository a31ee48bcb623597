"""LDAP and OpenID Connect configured together (docs/operations.md, directory sign-in): a name the LDAP
directory holds is the LDAP directory's, unless the operator says the OpenID provider names the same
people (`directory.oidc_shares_ldap_names`). Real slapd; the OpenID side starts at the checked ID
token's user, as in test_directory_attacks.py."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from codemoat.config import Settings
from codemoat.db import open_db
from codemoat.directory.ldap import DirUser
from codemoat.directory.service import DirectoryKeeper
from codemoat.errors import Unauthorized

ISSUER = "http://127.0.0.1:9"  # never contacted


@pytest.fixture
def both(dir_settings, home):
    """`both(shares)`: a keeper with the test LDAP directory and an OpenID provider, audited."""
    from codemoat.audit.log import AuditLog

    engine = open_db(f"sqlite:///{home / 'codemoat.db'}")
    made: list[DirectoryKeeper] = []

    def make(shares: bool = False) -> DirectoryKeeper:
        oidc = {"oidc_issuer": ISSUER, "oidc_client_id": "codemoat", "oidc_redirect_url": f"{ISSUER}/auth/oidc/callback"}
        cfg = dir_settings.model_copy(update={**oidc, "oidc_shares_ldap_names": shares})
        made.append(DirectoryKeeper(Settings(directory=cfg), engine, audit=AuditLog(engine)))
        return made[-1]

    yield make
    for k in made:
        k.directory.close()
    engine.dispose()


def _oidc(name: str, sub: str, *groups: str) -> DirUser:
    return DirUser(name, f"oidc:{ISSUER}#{sub}", frozenset(groups))


def _actions(k: DirectoryKeeper) -> list[tuple[str, dict]]:
    with k.engine.connect() as c:
        rows = c.execute(sa.text("select \"user\", detail from audit_records where kind = 'directory' order by seq")).all()
    return [(u, json.loads(d)) for u, d in rows]


def test_an_openid_user_cannot_take_a_name_the_ldap_directory_holds(both):
    """Was broken: with LDAP and OIDC both set, a provider user who named itself `alice`
    (`preferred_username`, often the user's own choice) and claimed the `admins` group got alice's
    account: a token as alice, her groups replaced by its own (admin), her directory binding taken."""
    k = both()
    k.sync()
    alice_secret, _ = k.login("alice", "alice-pw-1")
    for how, ttl in (("oidc", None), ("device", None), ("oidc-console", 60.0)):
        with pytest.raises(Unauthorized, match="belongs to the LDAP directory"):
            k.issue_token(_oidc("alice", "sub-mallory", "admins"), None, how=how, console_ttl_s=ttl)
    p = k.accounts.authenticate(alice_secret)
    assert p.user == "alice" and "payments" in p.groups and "admins" not in p.groups
    assert len([t for t in k.accounts.list_tokens() if t.user == "alice"]) == 1
    refused = [d for u, d in _actions(k) if u == "alice" and d["action"] == "refused"]
    assert len(refused) == 3 and "LDAP directory" in refused[0]["why"]


def test_a_name_an_openid_user_took_before_the_ldap_sync_loses_its_tokens(both):
    """Was broken: a provider user who signed in as `dave` before the first sync listed him kept its
    token when the sync bound the name to dave's LDAP entry, and from then on used it as dave, with
    dave's groups."""
    k = both()
    early, _ = k.issue_token(_oidc("dave", "sub-mallory"), None, how="oidc")
    assert k.accounts.authenticate(early).user == "dave"
    k.sync()
    with pytest.raises(Unauthorized):
        k.accounts.authenticate(early)
    assert [d["tokens_revoked"] for u, d in _actions(k) if u == "dave" and d["action"] == "rebound"] == [1]
    dave, _ = k.login("dave", "dave-pw-4")  # dave himself, through LDAP
    assert k.accounts.authenticate(dave).user == "dave"
    with pytest.raises(Unauthorized, match="belongs to the LDAP directory"):
        k.issue_token(_oidc("dave", "sub-mallory"), None, how="oidc")


def test_one_directory_behind_both_when_the_operator_says_so(both):
    """`oidc_shares_ldap_names = true` (the provider federates this LDAP): alice signs in either way
    under one name, and a sync moving the name back to her LDAP entry revokes nothing."""
    k = both(shares=True)
    k.sync()
    ldap_secret, _ = k.login("alice", "alice-pw-1")
    oidc_secret, info = k.issue_token(_oidc("alice", "sub-alice", "payments-devs"), None, how="oidc")
    assert info["user"] == "alice" and "payments" in info["groups"]
    k.sync()
    for secret in (ldap_secret, oidc_secret):
        assert k.accounts.authenticate(secret).user == "alice"
    assert not [d for _, d in _actions(k) if d["action"] in ("refused", "rebound")]
