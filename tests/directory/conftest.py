"""A real OpenLDAP (tests/directory/slapd.py) seeded with a small company, per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def slapd():
    from slapd import Slapd, slapd_bin

    exe = slapd_bin()
    if exe is None:
        pytest.skip("OpenLDAP is not installed here (Debian package `slapd`; .ci/run installs it)")
    pytest.importorskip("ldap3", reason="ldap3 is not installed (the `directory` extra)")
    s = Slapd(exe).start()
    yield s
    s.stop()


@pytest.fixture
def company(slapd):
    """alice (payments-devs, nested in engineering), bob (web), carol (disabled), dave (no group)."""
    people = {
        "alice": slapd.user("alice", "alice-pw-1"),
        "bob": slapd.user("bob", "bob-pw-2"),
        "carol": slapd.user("carol", "carol-pw-3", employeeType="disabled"),
        "dave": slapd.user("dave", "dave-pw-4"),
    }
    payments = slapd.group("payments-devs", [people["alice"]])
    slapd.group("engineering", [payments, people["bob"]])
    slapd.group("web", [people["bob"], people["carol"]])
    slapd.group("admins", [people["bob"]])
    slapd.people = people
    return slapd


@pytest.fixture
def dir_settings(company, tmp_path):
    """Settings pointing at the test directory (the service password in a 0600 file)."""
    from slapd import BASE, SERVICE

    from codemoat.config import DirectorySettings

    pw = tmp_path / "ldap-service-password"
    pw.write_text(company.service_pw + "\n")
    pw.chmod(0o600)
    return DirectorySettings(
        ldap_url=company.url,
        bind_dn=SERVICE,
        bind_password_file=str(pw),
        user_base=f"ou=people,{BASE}",
        group_base=f"ou=groups,{BASE}",
        disabled_filter="(employeeType=disabled)",
        group_map={"payments-devs": "payments", "web": "web", "engineering": "engineering", "admins": "admins"},
        admin_groups=["admins"],
        timeout_s=3,
    )


@pytest.fixture
def ldap_config(dir_settings, tmp_path):
    """`ldap_config(sync_interval_s)`: the path of a codemoat.toml whose [directory] is `dir_settings`
    (the test directory and its group map), syncing every `sync_interval_s` seconds (0: never)."""
    import json

    def write(sync_interval_s: int) -> str:
        d = dir_settings.model_dump()
        d["sync_interval_s"] = sync_interval_s
        cfg = tmp_path / "codemoat.toml"
        cfg.write_text(
            "[directory]\n"
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items() if v is not None and not isinstance(v, dict))
            + "[directory.group_map]\n"
            + "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in d["group_map"].items())
        )
        return str(cfg)

    return write


@pytest.fixture
def stub_provider():
    """A loopback provider that publishes what the test puts in its `docs` (discovery document, JWKS)."""
    from idtokens import StubProvider

    p = StubProvider()
    yield p
    p.close()


@pytest.fixture(scope="session")
def oidc_stack(tmp_path_factory, tiny_gguf):
    """One oidc-provider (device flow on) and one `codemoat serve` trusting it, for the session:
    alice (payments-devs), bob (it-admins -> the admin group), eve (no group)."""
    from oidcstack import start_stack

    users = {"alice": {"groups": ["payments-devs"]}, "bob": {"groups": ["it-admins"]}, "eve": {"groups": []}}
    stack = start_stack(tmp_path_factory.mktemp("oidc-stack"), tiny_gguf, users)
    yield stack
    stack.stop()
