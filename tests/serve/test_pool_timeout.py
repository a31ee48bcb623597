"""Every pooled database connection busy past the pool's timeout (sqlalchemy's TimeoutError, "QueuePool limit of
size 5 overflow 10 reached") is the retryable 503 a database outage is, on serve's routes and the key server's: it
was a 500 with a traceback (a reviewer). The pool's own error is raised where the app reads the database."""

from __future__ import annotations

import sqlalchemy.exc
from fastapi.testclient import TestClient

from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.db import open_db
from codemoat.engines.holder import ModelHolder
from codemoat.serve.app import create_app
from codemoat.serve.keyserver_app import KeyServerApp
from codemoat.vault.codec import b64d, canonical, ed_public, verify
from codemoat.vault.keyserver import REFUSAL_DOMAIN

POOL = sqlalchemy.exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00")


def test_a_pool_timeout_on_a_route_is_a_503_in_the_protocols_shape(home, monkeypatch):
    accounts = Accounts(open_db(f"sqlite:///{home / 'codemoat.db'}"))
    _, secret = accounts.create_token("dev", scopes=("complete",))
    app = create_app(Settings(), holder=ModelHolder("m"), accounts=accounts)

    def busy(*a, **kw):
        raise POOL

    with TestClient(app, base_url="http://testserver", raise_server_exceptions=False) as c:
        monkeypatch.setattr(accounts, "authenticate", busy)
        r = c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable", r.text
        r = c.post("/api/generate", json={"model": "m", "prompt": "x"}, headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 503 and isinstance(r.json()["error"], str), r.text


def test_a_pool_timeout_at_the_key_server_is_a_signed_503(vendor, monkeypatch):
    app = KeyServerApp(vendor)

    def busy(*a, **kw):
        raise POOL

    monkeypatch.setattr(app.state.keyserver, "challenge", busy)
    with TestClient(app, base_url="http://testserver", raise_server_exceptions=False) as c:
        r = c.post("/v1/lease/challenge", json={"license_id": "lic_1", "client_nonce": "n1"})
    assert r.status_code == 503, r.text
    doc = r.json()
    assert doc["error"]["code"] == "database_unavailable" and doc["error"]["nonce"] == "n1"
    verify(ed_public(vendor.keyserver_key_b64, "k"), b64d(doc["signature"]), REFUSAL_DOMAIN, canonical(doc["error"]), "r")
