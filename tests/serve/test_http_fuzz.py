"""Hostile bodies on every protocol's routes (issue 14, "done when"): the real app over a real
llama.cpp engine on the tiny model, driven by hypothesis. Whatever comes in: never a 500, never a
traceback in an answer, and exactly one audit record per authenticated request (none lost, none
doubled); without a token, a 401 and no more than one record per source."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit.trustapp import make_app, make_tokens, tiny_llm
from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.db import open_db

# A valid body per route: the fuzzer keeps, drops or replaces each field, and adds others.
ROUTES = {
    "/v1/completions": {
        "model": "tiny",
        "prompt": "def f(",
        "suffix": "):",
        "max_tokens": 3,
        "temperature": 0.5,
        "stop": ["\n"],
        "stream": False,
        "seed": 1,
        "codemoat": {"path": "a.py", "return_snippets": True},
    },
    "/v1/completions#tabby": {
        "language": "python",
        "segments": {
            "prefix": "def f(",
            "suffix": "):",
            "filepath": "a.py",
            "declarations": [{"filepath": "b.py", "body": "x = 1"}],
        },
        "temperature": 0.1,
        "debug_options": {"return_prompt": True, "return_snippets": True},
    },
    "/v1/chat/completions": {
        "model": "tiny",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
    "/api/generate": {
        "model": "tiny",
        "prompt": "def f(",
        "suffix": "):",
        "raw": True,
        "stream": False,
        "options": {"num_predict": 3, "temperature": 0.5, "top_k": 5, "stop": ["\n"]},
    },
    "/api/chat": {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "options": {"num_predict": 3},
    },
    "/api/show": {"model": "tiny"},
    "/infill": {
        "input_prefix": "def f(",
        "input_suffix": "):",
        "n_predict": 3,
        "stream": False,
        "input_extra": [{"filename": "b.py", "text": "x = 1"}],
        "t_max_predict_ms": 500,
        "n_indent": 4,
    },
    "/v1/events": {"type": "select", "completion_id": "cmpl-1", "choice_index": 0},
}

HOSTILE_TEXT = (
    st.sampled_from(
        [
            "",
            " ",
            "\ud800",
            "a\udfffb",
            "\x00",
            "\u202e",
            "\ufeff",
            "<|fim_middle|>",
            "<|endoftext|>",
            "{{ .Prompt }}",
            "%s%n",
            "-----BEGIN RSA PRIVATE KEY-----",
            "AKIA" + "QWERTYUIOPASDFGH",
            "x" * 5000,
            "\n" * 300,
            "../../etc/passwd",
            "tiny:latest",
            "select",
            "system",
            "developer",
            "tool",
            "user",
        ]
    )
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
    | st.text(max_size=40)
)  # the last with surrogates
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | HOSTILE_TEXT
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(HOSTILE_TEXT, inner, max_size=3), max_leaves=8
)


@st.composite
def bodies(draw) -> tuple[str, bytes]:
    route = draw(st.sampled_from(sorted(ROUTES)))
    how = draw(st.sampled_from(["text", "text", "text", "mutate", "mutate", "any_json", "bytes"]))
    if how == "bytes":
        return route, draw(st.binary(max_size=64) | st.sampled_from([b"", b"{", b"[" * 5000, b'{"a": 1e999999}', b"\xff\xfe{}"]))
    if how == "any_json":
        doc = draw(VALUES)
    elif how == "text":  # the shape stays valid: hostile text where text goes, so the request reaches the engine
        doc = _texts(draw, ROUTES[route])
    else:
        doc = _mutate(draw, ROUTES[route])
    return route, json.dumps(doc, allow_nan=True).encode()  # ASCII: lone surrogates travel as \ud800


def _texts(draw, doc):
    """`doc` with one or two of its strings replaced by hostile text."""
    doc = json.loads(json.dumps(doc))
    slots = []  # (container, key) of every string

    def walk(d):
        for k, v in d.items() if isinstance(d, dict) else enumerate(d):
            if isinstance(v, str):
                slots.append((d, k))
            elif isinstance(v, (dict, list)):
                walk(v)

    walk(doc)
    for d, k in draw(st.lists(st.sampled_from(slots), min_size=1, max_size=2)):
        d[k] = draw(HOSTILE_TEXT)
    return doc


def _mutate(draw, doc):
    if isinstance(doc, dict):
        out = {}
        for k, v in doc.items():
            action = draw(st.sampled_from(["keep", "keep", "drop", "replace", "recurse"]))
            if action == "keep":
                out[k] = v
            elif action == "replace":
                out[k] = draw(VALUES)
            elif action == "recurse":
                out[k] = _mutate(draw, v)
        out.update(draw(st.dictionaries(HOSTILE_TEXT, VALUES, max_size=2)))
        return out
    if isinstance(doc, list):
        return [_mutate(draw, v) for v in doc] + draw(st.lists(VALUES, max_size=2))
    return draw(VALUES) if draw(st.booleans()) else doc


llm = tiny_llm  # the module's engine (trustapp)


def _app(policy: str, llm):
    db = open_db()
    accounts = Accounts(db)
    app = make_app(Settings(model={"max_tokens_limit": 16, "default_max_tokens": 8}, policy={"secrets": policy}), accounts, llm)
    return app, make_tokens(accounts)["alice"], app.state.trust.log


def _check(r) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    assert "Traceback" not in r.text and 'File "' not in r.text, r.text[:500]


@pytest.mark.parametrize("policy", ["redact", "block"])
def test_hostile_bodies_authenticated(llm, policy):
    app, token, log = _app(policy, llm)

    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(bodies())
    def one(case):
        route, raw = case
        before = log.count("request")
        r = client.post(route.split("#")[0], content=raw, headers={**token, "Content-Type": "application/json"})
        _check(r)
        assert log.count("request") == before + 1, (route, raw[:200], r.status_code)

    with TestClient(app, raise_server_exceptions=False) as client:
        one()
    assert log.verify().ok


def test_hostile_bodies_without_a_token(llm):
    app, _, log = _app("block", llm)

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        bodies(), st.sampled_from([{}, {"Authorization": "Bearer cm_wrong"}, {"Authorization": "Basic eDp5"}, {"x-api-key": ""}])
    )
    def one(case, headers):
        route, raw = case
        r = client.post(route.split("#")[0], content=raw, headers={**headers, "Content-Type": "application/json"})
        _check(r)
        assert r.status_code == 401, (route, raw[:200], r.status_code, r.text[:200])
        assert log.count("request") <= 1  # the first from this source; the rest are tallied

    with TestClient(app, raise_server_exceptions=False) as client:
        one()
    assert log.count("unauthenticated") == 1 and log.count("request") == 1  # the tally, written at shutdown


def test_hostile_paths_and_methods_authenticated(llm):
    """Any path and method with a valid token: one record each (route template or "unmatched"), none verbatim."""
    app, token, log = _app("block", llm)
    methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "AKIAQWERTYUIOPASDFGH"])
    segment = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=12)
    paths = st.lists(segment, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts)) | st.sampled_from(
        ["/v1/models/..%2f..%2fetc", "/api/tags", "/v1/models", "/admin/api/audit", "/openapi.json", "/v1/completions"]
    )
    paths = paths.filter(lambda p: p not in ("/health", "/livez", "/metrics", "/v1/health"))  # probes: not recorded when answered

    @settings(max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(methods, paths)
    def one(method, path):
        before = log.count("request")
        r = client.request(method, path, headers=token)
        _check(r)
        assert log.count("request") == before + 1, (method, path, r.status_code)

    with TestClient(app, raise_server_exceptions=False) as client:
        one()
    recs = list(log.records(kind="request"))
    assert all(r["user"] == "alice" for r in recs)
    assert not any("AKIA" in json.dumps(r) for r in recs)
