"""The completion routes reached without FastAPI's router (`serve.hotpath`): same answers, errors and audit
records as through the router, on the real app over a real llama.cpp engine."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from audit.trustapp import GREEDY, fresh_db, make_app, make_tokens, records, tiny_llm
from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.serve.hotpath import HotRoutes, hot_routes

llm = tiny_llm  # the module's engine (trustapp)
db = fresh_db  # the test's own database engine (trustapp)

HOT = {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/api/generate"), ("POST", "/api/chat")}
HOT |= {("POST", "/infill")}
VARIES = ("id", "created", "created_at", "timings", "total_duration", "load_duration", "prompt_eval_duration", "eval_duration")


def _innermost(app: FastAPI):
    layer = app.middleware_stack
    while getattr(layer, "app", None) is not None:
        layer = layer.app
    return layer


def _same(body: dict) -> dict:
    """An answer without what differs between two answers (its id and time)."""
    return {k: v for k, v in body.items() if k not in VARIES}


def _lines(r) -> list[str]:
    """A stream's events without their ids and times."""
    out = []
    for line in r.iter_lines():
        if line.startswith("data: {"):
            out.append("data: " + json.dumps(_same(json.loads(line[6:]))))
        elif line.startswith("{"):  # Ollama's NDJSON
            out.append(json.dumps(_same(json.loads(line))))
        elif line:
            out.append(line)
    return out


def _exchange(c: TestClient, alice: dict) -> list:
    """What a client sees of the hot routes' answers and errors, and of a route the router serves."""
    out = []
    comp = {**GREEDY, "prompt": "def add(a, b):", "max_tokens": 5}
    chat = {**GREEDY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    options = {"num_predict": 4, "temperature": 0}
    generate = {"model": "tiny", "prompt": "def add(a, b):", "options": options, "stream": False}
    ochat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "options": options, "stream": False}
    infill = {"input_prefix": "def add(a, b):\n", "input_suffix": "\n", "n_predict": 4, "temperature": 0}
    for path, body in (
        ("/v1/completions", comp),
        ("/v1/chat/completions", chat),
        ("/api/generate", generate),
        ("/api/chat", ochat),
        ("/infill", infill),
    ):
        r = c.post(path, json=body, headers=alice)
        out.append((r.status_code, r.headers["content-type"], _same(r.json())))
        with c.stream("POST", path, json={**body, "stream": True}, headers=alice) as s:
            out.append((s.status_code, s.headers["content-type"], s.headers.get("cache-control"), _lines(s)))
        for headers, content in (
            ({}, json.dumps(body)),  # no token: 401
            (alice, "{not json"),  # 400
            (alice, json.dumps({**body, "model": "other"})),  # 404 in the protocol's shape
            (alice, json.dumps({**body, "max_tokens": 10**6, "n_predict": 10**6})),  # above the limit (or fitted): as before
        ):
            r = c.post(path, content=content, headers={**headers, "content-type": "application/json"})
            out.append((r.status_code, r.headers["content-type"], _same(r.json()) if r.status_code == 200 else r.content))
        r = c.get(path, headers=alice)  # no such method: the router's 405
        out.append((r.status_code, r.content))
    r = c.get("/v1/models", headers=alice)  # a route with a dependency: the router, as before
    out.append((r.status_code, r.json()["data"][0]["id"]))
    return out


def test_the_completion_routes_answer_and_are_audited_as_through_the_router(db, llm):
    accounts = Accounts(db)
    tokens = make_tokens(accounts)
    with TestClient(make_app(Settings(), accounts, llm)) as c:
        hot = _exchange(c, tokens["alice"])
        inner = _innermost(c.app)
    assert isinstance(inner, HotRoutes) and set(inner.table) == HOT
    hot_records = [(x["user"], x["route"], x["status"], x["completion_tokens"]) for x in records(db)]

    plain = make_app(Settings(), accounts, llm)
    plain.middleware_stack = FastAPI.build_middleware_stack(plain)  # FastAPI's own stack: every route through the router
    with TestClient(plain) as c:
        assert not isinstance(_innermost(c.app), HotRoutes)
        routed = _exchange(c, tokens["alice"])
    assert hot == routed
    # OpenAI refuses max_tokens above the limit; Ollama and llama.cpp fit it to the room left
    assert [s for s, *_ in hot] == [200, 200, 401, 400, 404, 400, 405] * 2 + [200, 200, 401, 400, 404, 200, 405] * 3 + [200]
    routed_records = [(x["user"], x["route"], x["status"], x["completion_tokens"]) for x in records(db)][len(hot_records) :]
    assert hot_records == routed_records  # the route's template, the caller, the status: from the hot path's scope too
    assert ("alice", "/v1/completions", 200, 5) in hot_records


def test_a_path_that_another_route_also_matches_is_left_to_the_router(db, llm):
    """The router picks the first match in order; a pattern that also matches a hot path could be that one."""
    app = make_app(Settings(), Accounts(db), llm)
    assert set(hot_routes(app.routes)) == HOT

    async def other(rest: str):
        return {"other": rest}

    app.add_api_route("/v1/{rest:path}", other, methods=["POST"])
    assert set(hot_routes(app.routes)) == {("POST", "/api/generate"), ("POST", "/api/chat"), ("POST", "/infill")}
    with TestClient(app) as c:
        assert not isinstance(_innermost(c.app), HotRoutes) or set(_innermost(c.app).table) < HOT
        assert c.post("/v1/completions", json={}).status_code == 401  # the router's pick: the first in order


@pytest.mark.parametrize("root_path", ["/codemoat"])
def test_a_request_under_a_root_path_goes_through_the_router(db, llm, root_path):
    accounts = Accounts(db)
    tokens = make_tokens(accounts)
    with TestClient(make_app(Settings(), accounts, llm), root_path=root_path) as c:
        r = c.post("/v1/completions", json={**GREEDY, "prompt": "x", "max_tokens": 2}, headers=tokens["alice"])
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
