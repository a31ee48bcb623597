"""The directory in a running `codemoat serve`: `codemoat login` trades a directory password for a
token; completions draw on the code the user's directory groups allow; when the directory drops
her from the group, the server's own periodic sync takes that code away without anyone running a
command; guessing passwords through the server is throttled."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow

LIB = 'def cents_to_display(cents):\n    """PAYMENTS_SECRET_HELPER"""\n    return f"{cents / 100:.2f}"\n'


def _snippets(url: str, token: str) -> str:
    body = {
        "model": "codemoat-tiny",
        "prompt": "from billing import cents_to_display\n\ndef total(c):\n    return cents_to_display(",
        "max_tokens": 1,
        "temperature": 0,
        "codemoat": {"repo": "payments", "path": "report.py", "return_snippets": True},
    }
    r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert r.status_code == 200, r.text
    return json.dumps(r.json())


def test_login_groups_and_periodic_sync(tmp_path, ldap_config, company, tiny_gguf, serve_process, monkeypatch):
    repo = tmp_path / "payments"
    repo.mkdir()
    (repo / "billing.py").write_text(LIB)
    assert run_cli("index", "add", str(repo), "--name", "payments", "--groups", "payments").returncode == 0
    monkeypatch.setenv("CODEMOAT_CONFIG", ldap_config(1))
    s = serve_process(["--model", str(tiny_gguf)])

    r = run_cli("login", "--server", s.url, "--user", "alice", "--password-stdin", "--json", input="alice-pw-1\n")
    assert r.returncode == 0, r.stderr
    alice = json.loads(r.stdout)
    assert alice["user"] == "alice" and "payments" in alice["groups"] and "admin" not in alice["scopes"]
    assert "PAYMENTS_SECRET_HELPER" in _snippets(s.url, alice["token"])

    r = run_cli("login", "--server", s.url, "--user", "alice", "--password-stdin", input="wrong\n")
    assert r.returncode == 1 and "401" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    # the directory drops alice from payments-devs; the server's sync (every second) follows
    company.modify("cn=payments-devs,ou=groups,dc=example,dc=com", {"member": [("MODIFY_REPLACE", [company.people["dave"]])]})
    deadline = time.time() + 30
    while "PAYMENTS_SECRET_HELPER" in _snippets(s.url, alice["token"]):
        assert time.time() < deadline, "the periodic sync never took payments away from alice"
        time.sleep(0.5)

    # removed from the directory altogether: her token stops working
    company.delete(company.people["alice"])
    deadline = time.time() + 30
    while httpx.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {alice['token']}"}, timeout=30).status_code != 401:
        assert time.time() < deadline, "the periodic sync never revoked alice's token"
        time.sleep(0.5)


def test_password_guessing_is_throttled(tmp_path, ldap_config, company, tiny_gguf, serve_process, monkeypatch):
    monkeypatch.setenv("CODEMOAT_CONFIG", ldap_config(0))
    s = serve_process(["--model", str(tiny_gguf)])
    codes = [
        httpx.post(s.url + "/auth/login", json={"username": "bob", "password": f"guess{i}"}, timeout=30).status_code
        for i in range(7)
    ]
    assert codes[:5] == [401] * 5 and codes[5:] == [429, 429]
    # even the right password waits out the window once it is locked
    r = httpx.post(s.url + "/auth/login", json={"username": "bob", "password": "bob-pw-2"}, timeout=30)
    assert r.status_code == 429 and "Retry-After" in r.headers
    # another user is not locked out by bob's guesser
    r = httpx.post(s.url + "/auth/login", json={"username": "alice", "password": "alice-pw-1"}, timeout=30)
    assert r.status_code == 200 and r.json()["token"].startswith("cm_")
    assert r.headers["cache-control"] == "no-store"  # the token is in the answer: no cache may keep it
    assert "alice-pw-1" not in s.output()
