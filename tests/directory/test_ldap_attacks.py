"""An outside attacker's review of LDAP sign-in against a real slapd: odd user names, odd DNs, group claims.

Held (no defect found): a user name with NUL, a typed RFC 4515 escape (`\\2a` is a literal
backslash and "2a", not a wildcard), parentheses, a 10,000-character name or control characters finds no
one and is a plain wrong-password refusal, never an outage (503) nor a traceback; a name spelt with other
case or spaces signs in as the directory's own name; a user whose DN holds `,` `+` `"` `\\` `#` `=` `<`
gets the same groups at sign-in (a search per level) and in a full sync (member values compared), and a
group naming a DN that only looks like a member's (other escaping of a different value) grants nothing.
Was broken: a lone surrogate in a name or password raised UnicodeEncodeError out of ldap3.
"""

from __future__ import annotations

import pytest

from codemoat.directory import LdapDirectory
from codemoat.errors import Unauthorized

ODD_NAMES = [
    "alice\x00",
    "\x00",
    "alice\x00)(uid=*",
    "\\2a",
    "al\\2aice",
    "(",
    "alice)(",
    "*)(|(objectClass=*)",
    "a" * 10_000,
    "alice\r\nuid: bob",
]


@pytest.mark.parametrize("name", ODD_NAMES, ids=range(len(ODD_NAMES)))
def test_odd_user_names_find_no_one_and_are_a_plain_refusal(dir_settings, name):
    d = LdapDirectory(dir_settings)
    try:
        assert d.find(name) is None
        with pytest.raises(Unauthorized, match="wrong user name or password"):
            d.authenticate(name, "alice-pw-1")
    finally:
        d.close()


def test_a_lone_surrogate_in_a_name_or_password_is_a_plain_refusal(dir_settings):
    """Was: ldap3 raised UnicodeEncodeError (a traceback) for a name or password holding a lone surrogate, which
    Python makes of bytes that are not UTF-8 (a command line's, a file's). /auth/login's JSON parser refuses one
    before it gets here; the directory refuses it too, as a wrong name or password."""
    d = LdapDirectory(dir_settings)
    try:
        assert d.find("\udcffalice") is None
        for name, pw in (("\ud800alice", "alice-pw-1"), ("alice", "alice-pw-1\udcff")):
            with pytest.raises(Unauthorized, match="wrong user name or password"):
                d.authenticate(name, pw)
    finally:
        d.close()


def test_a_name_spelt_otherwise_signs_in_as_the_directorys_own_name(dir_settings):
    d = LdapDirectory(dir_settings)
    try:
        for typed in ("ALICE", " alice", "alice ", "Alice"):
            assert d.authenticate(typed, "alice-pw-1").name == "alice"
        with pytest.raises(Unauthorized):
            d.authenticate("ALICE", "ALICE-PW-1")  # the password is not case-folded
    finally:
        d.close()


def test_a_dn_of_odd_characters_gets_the_same_groups_at_sign_in_and_in_a_sync(company, dir_settings):
    from slapd import BASE

    odd = f'cn=Smith\\, J. \\+ \\"Q\\" \\\\ \\#1 \\3C x\\=y,ou=people,{BASE}'
    company.add(
        odd, ["inetOrgPerson"], {"uid": "jsmith", "cn": 'Smith, J. + "Q" \\ #1 < x=y', "sn": "s", "userPassword": "j-pw-5"}
    )
    # a look-alike: the same text with its escapes spelt out, which is another DN (a literal backslash)
    look_alike = f"cn=Smith\\5C\\2C J.,ou=people,{BASE}"
    company.group("payments-devs-2", [odd])
    company.group("web-2", [look_alike])
    company.modify(
        f"cn=payments-devs,ou=groups,{BASE}",
        {"member": [("MODIFY_ADD", [odd.replace("cn=Smith", "CN=smith", 1)])]},  # another case: the same DN
    )
    d = LdapDirectory(dir_settings)
    try:
        u = d.authenticate("jsmith", "j-pw-5")
        assert u.dn.lower().startswith("cn=smith")
        assert u.groups == {"payments-devs-2", "payments-devs", "engineering"}, u.groups
        assert d.snapshot().users["jsmith"].groups == u.groups
        assert "web-2" not in u.groups
    finally:
        d.close()
