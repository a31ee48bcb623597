"""The trust layer in the real app (`create_app`, a real llama.cpp engine on the tiny model): one
audit record per request, 503 when it cannot audit, quotas, secrets, metrics, the admin API and
the egress guard."""

from __future__ import annotations

import socket
import sqlite3
import threading

import pytest
from fastapi.testclient import TestClient
from waiting import wait_for

from codemoat.accounts import Accounts
from codemoat.audit import egress
from codemoat.audit.egress import EgressBlocked
from codemoat.config import Settings

from .trustapp import GREEDY, Broken, Paced, db_bytes, make_app, records, tiny_llm


llm = tiny_llm  # the module's engine (trustapp)


def client_for(settings: Settings, accounts: Accounts, llm, **kw) -> TestClient:
    return TestClient(make_app(settings, accounts, llm), client=("10.9.8.7", 5555), **kw)


def complete(c, headers, prompt="x", max_tokens=4, **extra):
    return c.post("/v1/completions", json={**GREEDY, "prompt": prompt, "max_tokens": max_tokens, **extra}, headers=headers)


def test_one_record_per_request_with_its_facts(engine, accounts, tokens, llm):
    with client_for(Settings(), accounts, llm) as c:
        r = complete(c, tokens["alice"], "def add(a, b):", 7)
        assert r.status_code == 200
        used = r.json()["usage"]
        body = {
            **GREEDY,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        r = c.post("/v1/chat/completions", json=body, headers=tokens["bob"])
        assert r.status_code == 200 and r.text.endswith("[DONE]\n\n")
        streamed = [line for line in r.text.splitlines() if '"usage"' in line][-1]
        assert complete(c, {}).status_code == 401
        trust = c.app.state.trust
    recs = records(engine)
    assert [x["status"] for x in recs] == [200, 200, 401]
    first, chat = recs[0], recs[1]
    assert (first["user"], first["route"], first["protocol"], first["model"]) == ("alice", "/v1/completions", "openai", "tiny")
    assert (first["prompt_tokens"], first["completion_tokens"]) == (used["prompt_tokens"], used["completion_tokens"])
    assert first["completion_tokens"] == 7 and first["client"] == "10.9.8.7" and first["detail"]["method"] == "POST"
    assert first["token_id"].startswith("tok_") and first["latency_ms"] > 0
    assert first["prompt_text"] is None and first["completion_text"] is None  # no code kept by default
    assert chat["user"] == "bob" and f'"completion_tokens":{chat["completion_tokens"]}' in streamed.replace(" ", "")
    assert recs[2]["user"] is None
    rep = trust.log.verify()
    assert rep.ok and rep.checkpoints >= 1  # the shutdown checkpoint


def test_audit_log_shares_the_accounts_database_engine(engine, accounts, llm):
    """One engine, migrated once (the trust layer opened a second one and ran the migrations again)."""
    with client_for(Settings(), accounts, llm) as c:
        assert c.app.state.trust.log.engine is accounts.engine


def test_secret_never_reaches_the_database_file(engine, accounts, tokens, audit_home, llm):
    secret = "AKIA" + "QWERTYUIOPASDFGH"
    prompt = f"import boto3\nclient = boto3.client('s3', aws_access_key_id='{secret}')\n"
    with client_for(Settings(audit={"retain_text": True}), accounts, llm) as c:
        assert complete(c, tokens["alice"], prompt).status_code == 200
    rec = records(engine)[0]
    assert "[REDACTED:aws_access_key_id]" in rec["prompt_text"] and rec["detail"]["secrets"] == ["aws_access_key_id"]
    blob = db_bytes(audit_home)
    assert b"boto3.client" in blob  # the retained (redacted) text is there ...
    assert secret.encode() not in blob  # ... the secret is not


def test_prompt_text_not_kept_by_default(engine, accounts, tokens, audit_home, llm):
    marker = "def very_distinctive_function_name_4711():"
    with client_for(Settings(), accounts, llm) as c:
        assert complete(c, tokens["alice"], marker).status_code == 200
    assert len(records(engine)) == 1 and marker.encode() not in db_bytes(audit_home)


def test_block_policy_refuses_secret_prompts(engine, accounts, tokens, llm):
    token = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
    with client_for(Settings(policy={"secrets": "block"}), accounts, llm) as c:
        r = complete(c, tokens["alice"], f"gh = Github('{token}')")
        assert r.status_code == 400 and "github_token on line 1" in r.json()["error"]["message"] and token not in r.text
        assert r.json()["error"]["code"] == "secret_detected"
        assert complete(c, tokens["alice"], "x = 1").status_code == 200
    recs = records(engine)
    assert [(x["status"], x["user"], x["detail"].get("secrets")) for x in recs] == [
        (400, "alice", ["github_token"]),
        (200, "alice", None),
    ]
    assert recs[0]["completion_tokens"] == 0 and recs[0]["detail"]["note"] == "refused: secret in the request"


def test_block_policy_enforced_by_the_middleware_for_any_route(engine, accounts, tokens, llm):
    """Even a route that builds no prompt (Tabby's events) cannot take a secret."""
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n-----END OPENSSH PRIVATE KEY-----"
    with client_for(Settings(policy={"secrets": "block"}), accounts, llm) as c:
        r = c.post("/v1/events", json={"type": "select", "choice": {"text": key}}, headers=tokens["alice"])
        assert r.status_code == 400 and "private_key" in r.text and "b3BlbnNzaC1rZXkt" not in r.text
        assert c.post("/v1/events", json={"type": "select"}, headers=tokens["alice"]).status_code == 200
        assert complete(c, tokens["alice"], "x = 1").status_code == 200
    recs = records(engine)
    assert [(x["route"], x["status"], x["user"], x["detail"].get("secrets")) for x in recs] == [
        ("/v1/events", 400, "alice", ["private_key"]),
        ("/v1/events", 200, "alice", None),
        ("/v1/completions", 200, "alice", None),
    ]


def test_over_quota_token_gets_429_others_do_not(engine, accounts, tokens, llm):
    with client_for(Settings(policy={"requests_per_minute": 3}), accounts, llm) as c:
        for _ in range(3):
            assert complete(c, tokens["alice"]).status_code == 200
        r = complete(c, tokens["alice"])
        assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert complete(c, tokens["bob"]).status_code == 200
    assert [(x["status"], x["completion_tokens"]) for x in records(engine)] == [(200, 4)] * 3 + [(429, 0), (200, 4)]


def test_daily_token_quota_per_user(engine, accounts, tokens, llm):
    _, second = accounts.create_token("alice-laptop", user="alice")
    with client_for(Settings(policy={"tokens_per_day": 10}), accounts, llm) as c:
        assert complete(c, tokens["alice"], max_tokens=6).status_code == 200
        assert complete(c, tokens["alice"], max_tokens=6).status_code == 200
        r = complete(c, {"Authorization": f"Bearer {second}"})
        assert r.status_code == 429 and "daily token quota" in r.json()["error"]["message"]  # same user, other token
        assert int(r.headers["Retry-After"]) <= 86400
        assert complete(c, tokens["bob"]).status_code == 200
    # a restart does not reset the day: the counters are seeded from the audit log
    with client_for(Settings(policy={"tokens_per_day": 10}), accounts, llm) as c:
        assert complete(c, tokens["alice"]).status_code == 429


def test_unwritable_audit_log_refuses_service(engine, accounts, tokens, audit_home, llm):
    db = audit_home / "codemoat.db"
    with client_for(Settings(), accounts, llm) as c:
        ok = complete(c, tokens["alice"], "x", 5)
        assert ok.status_code == 200
        text = ok.json()["choices"][0]["text"]
        con = sqlite3.connect(db)
        con.execute("ALTER TABLE audit_records RENAME TO audit_records_moved")  # the log is gone
        con.commit()
        c.app.state.trust.log._probed_at = 0  # skip the 1 s probe cache
        r = complete(c, tokens["alice"], "x", 5)
        assert r.status_code == 503 and "audit log" in r.json()["error"]["message"]
        con.execute("ALTER TABLE audit_records_moved RENAME TO audit_records")
        con.execute("ALTER TABLE audit_head RENAME TO audit_head_moved")  # writable probe passes, the append fails
        con.commit()
        c.app.state.trust.log._probed_at = 0
        r = complete(c, tokens["alice"], "x", 5)
        assert r.status_code == 503 and text not in r.text  # generated (greedy: the same text), but not served unaudited
        con.execute("ALTER TABLE audit_head_moved RENAME TO audit_head")
        con.commit()
        c.app.state.trust.log._probed_at = 0
        assert complete(c, tokens["alice"]).status_code == 200
        metrics = c.get("/metrics", headers=tokens["scraper"]).text
        assert metrics.count("codemoat_audit_failures_total 2.0") == 1
    assert [x["status"] for x in records(engine)] == [200, 200]
    assert c.app.state.trust.log.verify().ok


def test_metrics(engine, accounts, tokens, llm):
    with client_for(Settings(), accounts, llm) as c:
        assert complete(c, tokens["alice"], "a b", 4).status_code == 200
        text = c.get("/metrics", headers=tokens["scraper"]).text
    assert 'codemoat_requests_total{protocol="openai",route="/v1/completions",status="2xx"} 1.0' in text
    assert 'codemoat_request_latency_seconds_count{route="/v1/completions"} 1.0' in text
    assert 'codemoat_tokens_total{kind="completion"} 4.0' in text
    assert "codemoat_model_loaded 1.0" in text and "codemoat_queue_depth 0.0" in text
    assert 'codemoat_lease_info{model_state="loaded",state="none"} 1.0' in text  # a plaintext model has no lease
    assert "codemoat_license_seconds_left" not in text
    assert [x["route"] for x in records(engine)] == ["/v1/completions"]  # a scrape is not recorded


def test_admin_api_needs_admin_scope(engine, accounts, tokens, llm):
    with client_for(Settings(), accounts, llm) as c:
        complete(c, tokens["alice"])
        assert c.get("/admin/api/audit", headers=tokens["alice"]).status_code == 403
        assert c.get("/admin/api/audit", headers=tokens["scraper"]).status_code == 403
        assert c.get("/admin/api/audit").status_code == 401
        r = c.get("/admin/api/audit", headers=tokens["root"])
        assert r.status_code == 200 and r.json()["records"][-1]["user"] == "alice"
        assert c.get("/admin/api/audit/verify", headers=tokens["root"]).json()["ok"] is True
        users = c.get("/admin/api/users", headers=tokens["root"]).json()["users"]
        assert {u["name"] for u in users} == {"alice", "bob", "root", "scraper"}
        toks = c.get("/admin/api/tokens", headers=tokens["root"]).json()["tokens"]
        assert {t["user"] for t in toks} == {"alice", "bob", "root", "scraper"} and not any("hash" in t for t in toks)
        assert c.get("/admin/api/alerts", headers=tokens["root"]).json()["alerts"] == []
        assert c.get("/admin/api/outbound", headers=tokens["root"]).json() == {"outbound": []}
        r = c.get("/admin/api/audit", params={"since": "99999999999999d"}, headers=tokens["root"])
        assert r.status_code == 400 and "too long" in r.text
        r = c.get("/admin/api/audit", params={"kind": "nosuch"}, headers=tokens["root"])
        assert r.status_code == 400 and "unknown record kind 'nosuch'" in r.text  # not an empty list
    recs = records(engine)
    assert [x["status"] for x in recs] == [
        200,
        403,
        403,
        401,
        200,
        200,
        200,
        200,
        200,
        200,
        400,
        400,
    ]  # admin reads are audited too


def test_egress_guard_armed_by_install_and_refusals_audited(engine, accounts, tokens, port, llm):
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen(4)
    blocked = other.getsockname()[1]
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen(4)
    try:
        with client_for(Settings(), accounts, llm) as c:
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
        assert [x["detail"]["destination"] for x in blocked_recs] == [f"127.0.0.1:{blocked}"] * 2
    finally:
        other.close()
        listener.close()


def test_distillation_alarm_raised_audited_and_throttles(engine, accounts, tokens, llm):
    from codemoat.audit.alarms import AlarmPolicy

    with client_for(Settings(model={"max_tokens_limit": 256}), accounts, llm) as c:
        trust = c.app.state.trust
        # small numbers so that ten requests look like a sweep; the heuristics themselves are in test_audit_alarms
        trust.alarms.policy = AlarmPolicy(
            min_requests=10, every=10, min_baseline=1, volume_factor=2, long_tokens=20, throttle_rpm=1
        )
        for i in range(10):
            prompt = "\n".join(f"def function_number_{i}_{j}(argument_{j}):" for j in range(5))
            r = complete(c, tokens["alice"], prompt, 200)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 20  # long, for the alarm
        assert complete(c, tokens["alice"], "x = 1").status_code == 200  # 1/min allowed
        r = complete(c, tokens["alice"], "x = 1")
        assert r.status_code == 429 and "distillation alarm" in r.json()["error"]["message"]
        assert complete(c, tokens["bob"], "x = 1").status_code == 200
        alerts = c.get("/admin/api/alerts", headers=tokens["root"]).json()["alerts"]
    assert [a["user"] for a in alerts] == ["alice"]
    assert set(alerts[0]["detail"]["reasons"]) == {"volume", "novelty", "long_unaccepted"}
    assert alerts[0]["detail"]["throttled_rpm"] == 1


def _uvicorn(app, port, **kw):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **kw))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    assert wait_for(lambda: server.started or not t.is_alive(), 60) and server.started, "uvicorn did not start"
    return server, t


def test_client_that_hangs_up_mid_stream_is_audited(engine, accounts, tokens, port, llm):
    """A real uvicorn server: the client reads two chunks of a stream and goes away."""
    import httpx

    server, t = _uvicorn(make_app(Settings(), accounts, Paced(llm, 0.05)), port)
    try:
        body = {**GREEDY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": True}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=tokens["alice"]) as c:
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                data = (line for line in r.iter_lines() if line.startswith("data:"))
                assert '"role"' in next(data) and '"content"' in next(data) and '"content"' in next(data)
            # the connection is closed here, long before the 40 chunks are sent
        got: list = []
        wait_for(lambda: bool(got.append(records(engine)) or got[-1]))  # the record follows the hang-up
        recs = got[-1]
    finally:
        server.should_exit = True
        t.join(timeout=10)
    assert len(recs) == 1 and recs[0]["status"] == 200 and recs[0]["user"] == "alice"
    assert 1 <= recs[0]["completion_tokens"] < 40  # what was generated before the hang-up


def test_engine_failure_is_audited_once_as_500(engine, accounts, tokens, llm):
    with TestClient(make_app(Settings(), accounts, Broken(llm)), raise_server_exceptions=False) as c:
        r = complete(c, tokens["alice"])
        assert r.status_code == 500 and "Traceback" not in r.text
    recs = records(engine)
    assert [(x["route"], x["status"]) for x in recs] == [("/v1/completions", 500)]
    assert recs[0]["detail"]["note"] == "RuntimeError while handling" and recs[0]["completion_tokens"] == 1


def test_request_cut_off_by_shutdown_is_still_audited(engine, accounts, tokens, port, llm):
    """uvicorn cancels what is still running after its grace period; the record is written before the process goes."""
    import httpx

    class Started(Paced):  # says when the request reached the engine: authenticated, inside the audit layer
        async def stream(self, prompt, params):
            started.set()
            async for ch in super().stream(prompt, params):
                yield ch

    started = threading.Event()
    server, t = _uvicorn(make_app(Settings(), accounts, Started(llm, 30)), port, timeout_graceful_shutdown=1)
    errors = []

    def call():
        try:
            httpx.post(
                f"http://127.0.0.1:{port}/v1/completions",
                json={**GREEDY, "prompt": "x", "max_tokens": 4},
                headers=tokens["alice"],
                timeout=60,
            )
        except httpx.HTTPError as e:
            errors.append(e)

    caller = threading.Thread(target=call)
    caller.start()
    assert started.wait(60), "the request never reached the engine"
    server.should_exit = True
    t.join(timeout=30)
    caller.join(timeout=30)
    recs = records(engine)
    assert [(x["route"], x["status"], x["user"]) for x in recs] == [("/v1/completions", 499, "alice")]
    assert "cancelled" in recs[0]["detail"]["note"]
