"""What answers without a token (issue 14 item 10, issue 15 A3 and A7): liveness only. Model,
license, traffic and the API's description need a token; metrics a metrics or admin token; the
admin routes are described only to admins."""

from __future__ import annotations

import warnings

import pytest
from fastapi.testclient import TestClient

from audit.trustapp import fresh_db, make_app, make_tokens, records, tiny_llm
from kept_holder import KeptHolder
from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.serve.app import create_app


llm = tiny_llm  # the module's engine (trustapp)


db = fresh_db  # the test's own database engine (trustapp)


@pytest.fixture
def client(db, llm):
    accounts = Accounts(db)
    with TestClient(make_app(Settings(), accounts, llm)) as c:
        c.tokens = make_tokens(accounts)
        yield c


BAD = {"Authorization": "Bearer cm_not-a-token"}


def test_health_without_a_token_is_liveness_only(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}  # no model path, license, machine or version
    assert client.get("/health", headers=BAD).status_code == 401  # a wrong token is not quietly ignored
    full = client.get("/health", headers=client.tokens["alice"]).json()
    assert full["model"] == "tiny" and full["state"] == "loaded" and full["engine"] and "model_file" in full


def test_health_liveness_says_unavailable_without_a_model(db):
    accounts = Accounts(db)
    with TestClient(create_app(Settings(), holder=KeptHolder("tiny"), accounts=accounts)) as c:  # nothing loaded
        r = c.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "unavailable"}  # not the reason: it can name a license
        _, tok = accounts.create_token("alice")
        assert c.get("/health", headers={"Authorization": f"Bearer {tok}"}).json()["reason"] == "model not loaded"


def test_tabby_health_needs_a_valid_token(client):
    for headers in ({}, BAD):
        for method in ("GET", "POST"):
            r = client.request(method, "/v1/health", headers=headers)
            assert r.status_code == 401 and r.json().keys() == {"error"}  # Tabby's error shape
            assert "tiny" not in r.text
    r = client.get("/v1/health", headers=client.tokens["alice"])
    assert r.status_code == 200 and r.json()["model"] == "tiny"
    assert client.post("/v1/health", headers=client.tokens["scraper"]).status_code == 200  # any valid token


def test_metrics_need_a_metrics_or_admin_token(client):
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=BAD).status_code == 401
    assert client.get("/metrics", headers=client.tokens["alice"]).status_code == 403  # a user's token reads no traffic
    for who in ("scraper", "root"):
        r = client.get("/metrics", headers=client.tokens[who])
        assert r.status_code == 200 and "codemoat_requests_in_flight" in r.text
    assert client.get("/admin/api/audit", headers=client.tokens["scraper"]).status_code == 403  # metrics only


def test_openapi_needs_a_token_and_hides_admin_routes_from_users(client):
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/openapi.json", headers=BAD).status_code == 401
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    user = client.get("/openapi.json", headers=client.tokens["alice"]).json()["paths"]
    assert "/v1/completions" in user and "/v1/health" in user
    assert not any(p.startswith("/admin/") for p in user)
    admin = client.get("/openapi.json", headers=client.tokens["root"]).json()["paths"]
    assert "/admin/api/audit" in admin


def test_operation_ids_are_unique(client):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FastAPI warns "Duplicate Operation ID" while building the document
        doc = client.get("/openapi.json", headers=client.tokens["root"]).json()
    ids = [op["operationId"] for path in doc["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))
    assert {doc["paths"]["/v1/health"]["get"]["operationId"], doc["paths"]["/v1/health"]["post"]["operationId"]} == {
        "health_v1_health_get",
        "health_post_v1_health_post",
    }


def test_probes_are_not_recorded_but_refused_probes_are(client, db):
    client.get("/health")
    client.get("/health", headers=client.tokens["alice"])
    client.get("/metrics", headers=client.tokens["scraper"])
    client.get("/v1/health", headers=client.tokens["alice"])
    assert records(db, None) == []
    client.get("/metrics", headers=client.tokens["alice"])  # a user's token, refused: worth seeing
    recs = records(db)
    assert [(r["route"], r["status"], r["user"]) for r in recs] == [("/metrics", 403, "alice")]
