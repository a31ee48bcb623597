"""A DBA of the shared PostgreSQL as an insider (multi-replica mode): editing the accounts tables directly.

What the product cannot notice (docs/threat-model.md, "Insiders"): the database is where tokens, scopes,
users and memberships live, unsigned, so a DBA can raise a token's scopes, mint a token by inserting its
SHA-256, put a revoked token back or add a user to a group, and every replica honours it within a second.
What it does keep: every request made that way is an audit record naming the user and the token id,
in the chain the DBA cannot cut past a signed head (tests/audit/test_insider_dba.py), also after the
DBA deletes the rows again. These tests pin that evidence.
"""

from __future__ import annotations

import hashlib
import time

import httpx
import pytest
import sqlalchemy as sa

from conftest import column, create_token, run_cli, verified_audit
from tests.serve.test_retrieval_serving import BODY  # the same completion that draws on payments' code

pytestmark = pytest.mark.slow


def _dba(url: str, *sql: str, **params) -> None:
    """The DBA's statements, in one transaction of their own."""
    eng = sa.create_engine(url)
    try:
        with eng.begin() as c:
            for q in sql:
                c.execute(sa.text(q), params)
    finally:
        eng.dispose()


def _until(call, want: int, seconds: float = 30) -> httpx.Response:
    """`call()` until it answers `want` (a replica honours a change made elsewhere within its cache's TTL)."""
    deadline = time.monotonic() + seconds
    while True:
        r = call()
        if r.status_code == want or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def test_what_a_dba_does_to_tokens_is_honoured_and_every_use_is_audited(pg_cluster, tiny_gguf, serve_process, monkeypatch):
    url = pg_cluster.new_database()
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    alice = create_token("--name", "alice")
    srv = serve_process(["--model", str(tiny_gguf)])

    def users(token: str) -> httpx.Response:
        return httpx.get(f"{srv.url}/admin/api/users", headers={"Authorization": f"Bearer {token}"}, timeout=30)

    assert users(alice).status_code == 403  # the product's own answer: not an admin
    # 1. the DBA raises alice's scopes: not noticed, honoured
    _dba(url, "update tokens set scopes = 'complete,chat,admin' where name = 'alice'")
    assert _until(lambda: users(alice), 200).status_code == 200
    # 2. the DBA mints a token of their own (the hash of a secret they chose), uses it, deletes it
    secret = "cm_dba-minted-secret"
    _dba(
        url,
        "insert into users (name, created_at, disabled) values ('ghost', 0, false)",
        "insert into tokens (id, name, \"user\", hash, scopes, created_at) values ('tok_ghost', 'ghost', 'ghost', :h, 'admin', 0)",
        h=hashlib.sha256(secret.encode()).hexdigest(),
    )
    assert _until(lambda: users(secret), 200).status_code == 200
    _dba(url, "delete from tokens where id = 'tok_ghost'", "delete from users where name = 'ghost'")
    assert _until(lambda: users(secret), 401).status_code == 401
    # 3. a revoked token put back
    assert run_cli("tokens", "revoke", "alice").returncode == 0
    assert _until(lambda: users(alice), 401).status_code == 401
    _dba(url, "update tokens set revoked_at = null where name = 'alice'")
    assert _until(lambda: users(alice), 200).status_code == 200
    srv.stop()
    # the evidence: each use is a record naming user and token id, and the chain verifies with them in it
    rep = verified_audit()
    assert rep["ok"]
    alice_id = column(url, "select id from tokens where name = 'alice'")[0]
    admin_calls = column(
        url, "select \"user\" || ' ' || token_id || ' ' || status from audit_records where route = '/admin/api/users'"
    )
    assert f"alice {alice_id} 200" in admin_calls and "ghost tok_ghost 200" in admin_calls, admin_calls
    assert column(url, "select count(*) from tokens where id = 'tok_ghost'") == [0]  # gone from accounts, not from the log


LIB = '"""Money helpers."""\n\n\ndef cents_to_display(cents: int, currency: str = "EUR") -> str:\n    return f"{cents / 100:.2f} {currency}"\n'


def test_a_dba_adding_themselves_to_a_group_reads_its_code_and_the_log_names_the_repository(
    pg_cluster, random_gguf, serve_process, monkeypatch, tmp_path
):
    url = pg_cluster.new_database()
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    root = tmp_path / "payments"
    (root / "billing").mkdir(parents=True)
    (root / "billing" / "money.py").write_text(LIB)
    assert run_cli("index", "add", str(root), "--name", "payments", "--groups", "payments").returncode == 0
    assert run_cli("users", "add", "mallory", "--groups", "web").returncode == 0
    mallory = create_token("--name", "mallory-editor", "--user", "mallory")
    srv = serve_process(["--model", str(random_gguf), "--model-id", "tiny"])

    def snippets() -> list:
        h = {"Authorization": f"Bearer {mallory}"}
        r = httpx.post(f"{srv.url}/v1/completions", json=BODY, headers=h, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["codemoat"]["snippets"]

    assert snippets() == []  # the product's own answer: mallory is not in payments
    _dba(
        url,
        "insert into groups (name, created_at) values ('payments', 0) on conflict do nothing",
        "insert into memberships (\"user\", \"group\") values ('mallory', 'payments')",
    )
    deadline = time.monotonic() + 30
    while not (got := snippets()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any("cents_to_display" in s["text"] for s in got), got  # not noticed: honoured
    _dba(url, "delete from memberships where \"user\" = 'mallory' and \"group\" = 'payments'")
    srv.stop()
    verified_audit()
    used = column(url, "select repos from audit_records where \"user\" = 'mallory' and route = '/v1/completions'")
    assert any(r and "payments" in r for r in used), used  # the evidence stays after the row is gone
