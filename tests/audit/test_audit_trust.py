"""The trust layer in a running app: one audit record per request, 503 when it cannot audit,
quotas, secrets, metrics, the admin API and the egress guard."""

from __future__ import annotations

import socket
import sqlite3

import pytest
from fastapi.testclient import TestClient

from codemoat.accounts import Accounts
from codemoat.audit import egress
from codemoat.audit.egress import EgressBlocked
from codemoat.config import Settings

from .trustapp import make_app


@pytest.fixture
def accounts(engine):
    return Accounts(engine)


@pytest.fixture
def tokens(accounts):
    out = {}
    for name, scopes in (("alice", ("complete", "chat")), ("bob", ("complete", "chat")), ("root", ("admin",))):
        _, secret = accounts.create_token(name, user=name, scopes=scopes)
        out[name] = {"Authorization": f"Bearer {secret}"}
    return out


def client_for(settings: Settings, accounts: Accounts) -> TestClient:
    return TestClient(make_app(settings, accounts), client=("10.9.8.7", 5555))


def records(engine, kind="request"):
    from codemoat.audit.log import AuditLog

    return list(AuditLog(engine).records(kind=kind))


def test_one_record_per_request_with_its_facts(engine, accounts, tokens):
    with client_for(Settings(), accounts) as c:
        assert c.post("/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 7}, headers=tokens["alice"]).status_code == 200
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, headers=tokens["bob"])
        assert r.status_code == 200 and r.text.endswith("[DONE]\n\n")
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 401
        assert c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v1/nowhere", headers=tokens["alice"]).status_code == 404
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200  # probes are not audited
        trust = c.app.state.trust
    recs = records(engine)
    assert [r["status"] for r in recs] == [200, 200, 401, 401, 404]
    first, chat = recs[0], recs[1]
    assert (first["user"], first["route"], first["protocol"], first["model"]) == ("alice", "/v1/completions", "openai", "tiny")
    assert first["repos"] == ["acme/api"] and first["snippets"] == ["acme/api:src/a.py:1-20"]
    assert (first["prompt_tokens"], first["completion_tokens"], first["client"]) == (3, 7, "10.9.8.7")
    assert first["token_id"].startswith("tok_") and first["latency_ms"] > 0
    assert first["prompt_text"] is None and first["completion_text"] is None  # no code kept by default
    assert chat["user"] == "bob" and chat["completion_tokens"] == 4  # counted after the stream ended
    assert recs[2]["user"] is None
    rep = trust.log.verify()
    assert rep.ok and rep.checkpoints >= 1  # the shutdown checkpoint


def test_secret_never_reaches_the_database_file(engine, accounts, tokens, audit_home):
    secret = "AKIA" + "QWERTYUIOPASDFGH"
    prompt = f"import boto3\nclient = boto3.client('s3', aws_access_key_id='{secret}')\n"
    with client_for(Settings(audit={"retain_text": True}), accounts) as c:
        assert c.post("/v1/completions", json={"prompt": prompt}, headers=tokens["alice"]).status_code == 200
    rec = records(engine)[0]
    assert "[REDACTED:aws_access_key_id]" in rec["prompt_text"] and rec["detail"]["secrets"] == ["aws_access_key_id"]
    blob = b"".join(p.read_bytes() for p in audit_home.glob("codemoat.db*"))
    assert b"boto3.client" in blob  # the retained (redacted) text is there ...
    assert secret.encode() not in blob  # ... the secret is not


def test_prompt_text_not_kept_by_default(engine, accounts, tokens, audit_home):
    marker = "def very_distinctive_function_name_4711():"
    with client_for(Settings(), accounts) as c:
        assert c.post("/v1/completions", json={"prompt": marker}, headers=tokens["alice"]).status_code == 200
    blob = b"".join(p.read_bytes() for p in audit_home.glob("codemoat.db*"))
    assert len(records(engine)) == 1 and marker.encode() not in blob


def test_block_policy_refuses_secret_prompts(engine, accounts, tokens):
    token = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
    with client_for(Settings(policy={"secrets": "block"}), accounts) as c:
        r = c.post("/v1/completions", json={"prompt": f"gh = Github('{token}')"}, headers=tokens["alice"])
        assert r.status_code == 400 and "github_token on line 1" in r.json()["error"]["message"] and token not in r.text
        assert c.post("/v1/completions", json={"prompt": "x = 1"}, headers=tokens["alice"]).status_code == 200
        assert c.app.state.handled == 1
    assert [(r["status"], r["detail"].get("secrets")) for r in records(engine)] == [(400, ["github_token"]), (200, None)]


def test_over_quota_token_gets_429_others_do_not(engine, accounts, tokens):
    with client_for(Settings(policy={"requests_per_minute": 3}), accounts) as c:
        for _ in range(3):
            assert c.post("/v1/completions", json={"prompt": "a"}, headers=tokens["alice"]).status_code == 200
        r = c.post("/v1/completions", json={"prompt": "a"}, headers=tokens["alice"])
        assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert c.post("/v1/completions", json={"prompt": "a"}, headers=tokens["bob"]).status_code == 200
        assert c.app.state.handled == 4
    assert [r["status"] for r in records(engine)] == [200, 200, 200, 429, 200]


def test_daily_token_quota_per_user(engine, accounts, tokens):
    _, second = accounts.create_token("alice-laptop", user="alice")
    with client_for(Settings(policy={"tokens_per_day": 10}), accounts) as c:
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 6}, headers=tokens["alice"]).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 6}, headers=tokens["alice"]).status_code == 200
        r = c.post("/v1/completions", json={"prompt": "a"}, headers={"Authorization": f"Bearer {second}"})
        assert r.status_code == 429 and "daily token quota" in r.json()["error"]["message"]  # same user, other token
        assert int(r.headers["Retry-After"]) <= 86400
        assert c.post("/v1/completions", json={"prompt": "a"}, headers=tokens["bob"]).status_code == 200
    # a restart does not reset the day: the counters are seeded from the audit log
    with client_for(Settings(policy={"tokens_per_day": 10}), accounts) as c:
        assert c.post("/v1/completions", json={"prompt": "a"}, headers=tokens["alice"]).status_code == 429


def test_unwritable_audit_log_refuses_service(engine, accounts, tokens, audit_home):
    db = audit_home / "codemoat.db"
    with client_for(Settings(), accounts) as c:
        assert c.post("/v1/completions", json={"prompt": "a"}, headers=tokens["alice"]).status_code == 200
        con = sqlite3.connect(db)
        con.execute("ALTER TABLE audit_records RENAME TO audit_records_moved")  # the log is gone
        con.commit()
        c.app.state.trust.log._probed_at = 0  # skip the 1 s probe cache
        r = c.post("/v1/completions", json={"prompt": "a"}, headers=tokens["alice"])
        assert r.status_code == 503 and "audit log" in r.json()["error"]["message"]
        assert c.app.state.handled == 1  # refused before handling
        con.execute("ALTER TABLE audit_records_moved RENAME TO audit_records")
        con.execute("ALTER TABLE audit_head RENAME TO audit_head_moved")  # writable probe passes, the append fails
        con.commit()
        c.app.state.trust.log._probed_at = 0
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 3}, headers=tokens["alice"])
        assert r.status_code == 503 and "ok ok ok" not in r.text  # handled, but not served unaudited
        con.execute("ALTER TABLE audit_head_moved RENAME TO audit_head")
        con.commit()
        c.app.state.trust.log._probed_at = 0
        assert c.post("/v1/completions", json={"prompt": "a"}, headers=tokens["alice"]).status_code == 200
        assert c.get("/metrics").text.count("codemoat_audit_failures_total 2.0") == 1
    assert [r["status"] for r in records(engine)] == [200, 200]
    assert c.app.state.trust.log.verify().ok


def test_metrics(engine, accounts, tokens):
    from codemoat.engines.holder import ModelHolder

    with client_for(Settings(), accounts) as c:
        c.app.state.holder.info.update(lease_state="active", expires_at=__import__("time").time() + 3600)
        c.post("/v1/completions", json={"prompt": "a b", "max_tokens": 4}, headers=tokens["alice"])
        text = c.get("/metrics").text
    assert 'codemoat_requests_total{protocol="openai",route="/v1/completions",status="2xx"} 1.0' in text
    assert 'codemoat_request_latency_seconds_count{route="/v1/completions"} 1.0' in text
    assert 'codemoat_tokens_total{kind="completion"} 4.0' in text
    assert "codemoat_model_loaded 0.0" in text and "codemoat_queue_depth 0.0" in text
    assert 'codemoat_lease_info{model_state="unloaded",state="active"} 1.0' in text
    left = float(next(l for l in text.splitlines() if l.startswith("codemoat_license_seconds_left ")).split()[1])
    assert 3500 < left <= 3600
    assert isinstance(ModelHolder("x").loaded, bool)


def test_admin_api_needs_admin_scope(engine, accounts, tokens):
    with client_for(Settings(), accounts) as c:
        c.post("/v1/completions", json={"prompt": "a"}, headers=tokens["alice"])
        assert c.get("/admin/api/audit", headers=tokens["alice"]).status_code == 403
        assert c.get("/admin/api/audit").status_code == 401
        r = c.get("/admin/api/audit", headers=tokens["root"])
        assert r.status_code == 200 and r.json()["records"][-1]["user"] == "alice"
        assert c.get("/admin/api/audit/verify", headers=tokens["root"]).json()["ok"] is True
        users = c.get("/admin/api/users", headers=tokens["root"]).json()["users"]
        assert {u["name"] for u in users} == {"alice", "bob", "root"}
        toks = c.get("/admin/api/tokens", headers=tokens["root"]).json()["tokens"]
        assert {t["user"] for t in toks} == {"alice", "bob", "root"} and not any("hash" in t for t in toks)
        assert c.get("/admin/api/alerts", headers=tokens["root"]).json()["alerts"] == []
        assert c.get("/admin/api/outbound", headers=tokens["root"]).json() == {"outbound": []}
        r = c.get("/admin/api/audit", params={"since": "99999999999999d"}, headers=tokens["root"])
        assert r.status_code == 400 and "too long" in r.text
        r = c.get("/admin/api/audit", params={"kind": "nosuch"}, headers=tokens["root"])
        assert r.status_code == 400 and "unknown record kind 'nosuch'" in r.text  # not an empty list
    recs = records(engine)
    assert [r["status"] for r in recs] == [200, 403, 401, 200, 200, 200, 200, 200, 200, 400, 400]  # admin reads are audited too


def test_egress_guard_armed_by_install_and_refusals_audited(engine, accounts, tokens, port):
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen(4)
    blocked = other.getsockname()[1]
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen(4)
    try:
        with client_for(Settings(), accounts) as c:
            trust = c.app.state.trust
            assert egress.armed() is trust.guard
            trust.guard.loopback = False  # stand-in for the internet: loopback is refused unless listed
            c.app.state.egress_allow.append(f"127.0.0.1:{port}")  # as the lead does for the key server
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            for _ in range(2):
                with pytest.raises(EgressBlocked):
                    socket.create_connection(("127.0.0.1", blocked), timeout=2)
            trust.guard.loopback = True
        assert egress.armed() is None  # disarmed at shutdown
        blocked_recs = records(engine, "egress_blocked")
        assert [r["detail"]["destination"] for r in blocked_recs] == [f"127.0.0.1:{blocked}"] * 2
    finally:
        other.close()
        listener.close()


def test_distillation_alarm_raised_audited_and_throttles(engine, accounts, tokens):
    from codemoat.audit.alarms import AlarmPolicy

    with client_for(Settings(), accounts) as c:
        trust = c.app.state.trust
        # small numbers so that ten requests look like a sweep; the heuristics themselves are in test_audit_alarms
        trust.alarms.policy = AlarmPolicy(min_requests=10, every=10, min_baseline=1, volume_factor=2, long_tokens=100, throttle_rpm=1)
        for i in range(10):
            prompt = "\n".join(f"def function_number_{i}_{j}(argument_{j}):" for j in range(5))
            assert c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 200}, headers=tokens["alice"]).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x = 1"}, headers=tokens["alice"]).status_code == 200  # 1/min allowed
        r = c.post("/v1/completions", json={"prompt": "x = 1"}, headers=tokens["alice"])
        assert r.status_code == 429 and "distillation alarm" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"prompt": "x = 1"}, headers=tokens["bob"]).status_code == 200
        alerts = c.get("/admin/api/alerts", headers=tokens["root"]).json()["alerts"]
    assert [a["user"] for a in alerts] == ["alice"]
    assert set(alerts[0]["detail"]["reasons"]) == {"volume", "novelty", "long_unaccepted"}
    assert alerts[0]["detail"]["throttled_rpm"] == 1


def test_client_that_hangs_up_mid_stream_is_audited(engine, accounts, tokens, port):
    """A real uvicorn server: the client reads two chunks of a stream and goes away."""
    import threading
    import time

    import httpx
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(make_app(Settings(), accounts), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=tokens["alice"]) as c:
            with c.stream("POST", "/v1/chat/completions", json={"slow": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data:")
            # the connection is closed here, long before the 40 chunks are sent
        for _ in range(100):
            recs = records(engine)
            if recs:
                break
            time.sleep(0.05)
    finally:
        server.should_exit = True
        t.join(timeout=10)
    assert len(recs) == 1 and recs[0]["status"] == 200 and recs[0]["user"] == "alice"
    assert 1 <= recs[0]["completion_tokens"] < 40  # what was generated before the hang-up


def test_handler_crash_is_audited_once_as_500(engine, accounts, tokens):
    with TestClient(make_app(Settings(), accounts), raise_server_exceptions=False) as c:
        assert c.post("/v1/boom", json={}, headers=tokens["alice"]).status_code == 500
        assert c.post("/v1/completions", json={"prompt": "a"}, headers=tokens["alice"]).status_code == 200
    recs = records(engine)
    assert [(r["route"], r["status"]) for r in recs] == [("/v1/boom", 500), ("/v1/completions", 200)]
    assert recs[0]["detail"]["note"] == "RuntimeError while handling" and recs[0]["prompt_tokens"] == 3


def test_block_policy_enforced_by_the_middleware_for_any_route(engine, accounts, tokens):
    """Even a route that never calls screen_prompt (here the Tabby events route) cannot take a secret."""
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n-----END OPENSSH PRIVATE KEY-----"
    with client_for(Settings(policy={"secrets": "block"}), accounts) as c:
        r = c.post("/v1/events", json={"type": "select", "choice": {"text": key}}, headers=tokens["alice"])
        assert r.status_code == 400 and "private_key" in r.text and "b3BlbnNzaC1rZXkt" not in r.text
        assert c.post("/v1/events", json={"type": "select"}, headers=tokens["alice"]).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x = 1"}, headers=tokens["alice"]).status_code == 200
    recs = records(engine)
    assert [(r["route"], r["status"], r["user"], r["detail"].get("secrets")) for r in recs] == [
        ("/v1/events", 400, "alice", ["private_key"]), ("/v1/events", 200, "alice", None), ("/v1/completions", 200, "alice", None)]


def test_request_cut_off_by_shutdown_is_still_audited(engine, accounts, tokens, port):
    """uvicorn cancels what is still running after its grace period; the record is written before the process goes."""
    import threading
    import time

    import httpx
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(make_app(Settings(), accounts), host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=1))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    errors = []

    def call():
        try:
            httpx.post(f"http://127.0.0.1:{port}/v1/slow", json={}, headers=tokens["alice"], timeout=30)
        except httpx.HTTPError as e:
            errors.append(e)

    caller = threading.Thread(target=call)
    caller.start()
    for _ in range(100):
        if server.server_state.total_requests:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    server.should_exit = True
    t.join(timeout=30)
    caller.join(timeout=30)
    recs = records(engine)
    assert [(r["route"], r["status"], r["user"]) for r in recs] == [("/v1/slow", 499, "alice")]
    assert "cancelled" in recs[0]["detail"]["note"]
