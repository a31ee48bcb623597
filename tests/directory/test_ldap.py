"""LDAP sign-in and group membership against a real slapd: passwords checked by the directory,
injection refused, nested groups followed, disabled accounts refused, outages fail closed."""

from __future__ import annotations

import pytest

from codemoat.directory import DirectoryError, DirectoryUnavailable, LdapDirectory
from codemoat.errors import Unauthorized


def test_password_is_checked_by_the_directory(dir_settings):
    d = LdapDirectory(dir_settings)
    u = d.authenticate("alice", "alice-pw-1")
    assert u.name == "alice" and u.dn.startswith("uid=alice,")
    with pytest.raises(Unauthorized, match="wrong user name or password"):
        d.authenticate("alice", "alice-pw-2")
    with pytest.raises(Unauthorized, match="wrong user name or password"):
        d.authenticate("nobody", "x")


@pytest.mark.parametrize("password", ["", None])
def test_empty_password_is_never_an_anonymous_bind(dir_settings, password):
    """LDAP accepts a bind with a DN and no password as anonymous ("unauthenticated", RFC 4513
    §5.1.2): it must not count as alice signing in."""
    with pytest.raises(Unauthorized):
        LdapDirectory(dir_settings).authenticate("alice", password)


@pytest.mark.parametrize("name", ["*", "*)(uid=*", "alice)(|(uid=*", "al*", "alice\\", "*)(objectClass=*"])
def test_filter_injection_finds_no_one(dir_settings, name):
    """User names are escaped per RFC 4515: a wildcard or a closing parenthesis is literal text."""
    d = LdapDirectory(dir_settings)
    assert d.find(name) is None
    with pytest.raises(Unauthorized):
        d.authenticate(name, "alice-pw-1")


def test_nested_groups_are_followed(dir_settings):
    d = LdapDirectory(dir_settings)
    alice = d.find("alice")
    assert alice.groups == {"payments-devs", "engineering"}  # engineering through payments-devs
    assert d.find("bob").groups == {"engineering", "web", "admins"}
    assert d.find("dave").groups == frozenset()


def test_disabled_account_is_refused(dir_settings):
    d = LdapDirectory(dir_settings)
    assert d.find("carol").disabled
    with pytest.raises(Unauthorized, match="disabled"):
        d.authenticate("carol", "carol-pw-3")


def test_snapshot_lists_everyone_with_groups(dir_settings):
    snap = LdapDirectory(dir_settings).snapshot()
    assert set(snap.users) == {"alice", "bob", "carol", "dave"}
    assert snap.users["carol"].disabled and not snap.users["alice"].disabled
    assert snap.users["alice"].groups == {"payments-devs", "engineering"}


def test_wrong_service_password_is_one_line(dir_settings, tmp_path):
    bad = tmp_path / "wrong"
    bad.write_text("not-the-password")
    d = LdapDirectory(dir_settings.model_copy(update={"bind_password_file": str(bad)}))
    with pytest.raises(DirectoryError, match="refused the service account"):
        d.snapshot()


def test_unreachable_directory_fails_closed(dir_settings, company):
    company.stop()
    d = LdapDirectory(dir_settings)
    with pytest.raises(DirectoryUnavailable, match="unreachable"):
        d.authenticate("alice", "alice-pw-1")
    with pytest.raises(DirectoryUnavailable):
        d.snapshot()


def test_connections_are_pooled_and_a_password_check_never_searches(dir_settings):
    """Concurrent sign-ins share at most `ldap_pool_size` connections per pool; a wrong password
    drops its connection (never back in the pool half-bound); the connection re-bound as a user is
    never the one that searches."""
    from concurrent.futures import ThreadPoolExecutor

    d = LdapDirectory(dir_settings.model_copy(update={"ldap_pool_size": 2}))
    pairs = [("alice", "alice-pw-1"), ("bob", "bob-pw-2"), ("dave", "dave-pw-4")] * 6
    with ThreadPoolExecutor(8) as ex:
        users = list(ex.map(lambda p: d.authenticate(*p), pairs))
    assert [u.name for u in users] == [p[0] for p in pairs]
    assert users[1].groups == {"engineering", "web", "admins"}
    assert d.service_pool.opened <= 2 and d.check_pool.opened <= 2
    idle = d.check_pool._free.qsize()
    with pytest.raises(Unauthorized, match="wrong user name or password"):
        d.authenticate("alice", "bob-pw-2")
    assert d.check_pool._free.qsize() == idle - 1  # the refused bind's connection was dropped, not pooled
    assert d.authenticate("alice", "alice-pw-1").name == "alice"
    for conn in list(d.service_pool._free.queue):
        assert conn.user == dir_settings.bind_dn  # searches only ever run as the service account
    d.close()


def test_a_pool_survives_the_directory_restarting(dir_settings, company):
    d = LdapDirectory(dir_settings)
    assert d.authenticate("alice", "alice-pw-1").name == "alice"
    company.stop(keep=True)
    with pytest.raises(DirectoryUnavailable):
        d.authenticate("alice", "alice-pw-1")
    company.restart()
    assert d.authenticate("alice", "alice-pw-1").name == "alice"  # broken connections dropped, fresh ones opened
    d.close()
