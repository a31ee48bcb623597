"""Routes through FastAPI's TestClient over a real llama.cpp engine: shapes and errors per protocol."""

import json

import pytest
from fastapi.testclient import TestClient

from codemoat.accounts import Accounts
from codemoat.config import load_settings
from codemoat.db import open_db
from codemoat.engines.holder import ModelHolder
from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.serve.app import create_app
from kept_holder import KeptHolder


@pytest.fixture
def engine(random_gguf):
    e = LlamaCppEngine.from_path(random_gguf, model_id="tiny", n_ctx=512, n_threads=1)
    yield e
    e.close()


@pytest.fixture
def client(engine):
    settings = load_settings(**{"model.max_tokens_limit": 64})
    accounts = Accounts(open_db())
    holder = KeptHolder("tiny")
    holder.set(engine)
    app = create_app(settings, holder=holder, accounts=accounts)
    _, tok = accounts.create_token("alice")
    _, chat_only = accounts.create_token("bob", scopes=("chat",))
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {tok}"
        c.chat_only = chat_only
        c.accounts = accounts
        c.holder = holder
        yield c


def test_health_liveness_is_open_details_need_a_token(client):
    r = client.get("/health", headers={"Authorization": ""})
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert client.get("/health").json()["model"] == "tiny"  # the client's token
    assert client.get("/v1/health", headers={"Authorization": ""}).status_code == 401
    assert client.get("/v1/health").json()["model"] == "tiny"


def test_openai_completion_with_suffix_uses_fim(client):
    r = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "def f(", "suffix": "):\n", "max_tokens": 5, "temperature": 0}
    )
    body = r.json()
    assert r.status_code == 200, body
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] <= 5
    assert body["usage"]["prompt_tokens"] >= 5  # FIM sentinels were added


def test_openai_completion_stream(client):
    # greedy: sampling, the random model ends within 4 tokens in about 3% of runs ("stop", not "length")
    with client.stream(
        "POST", "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4, "stream": True, "temperature": 0}
    ) as r:
        lines = [l for l in r.iter_lines() if l.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(l[6:]) for l in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_nonstream_and_stream_with_usage(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "tiny", "messages": msgs, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        ev = [json.loads(l[6:]) for l in r.iter_lines() if l.startswith("data: {")]
    assert ev[0]["choices"][0]["delta"]["role"] == "assistant"
    assert ev[-1]["choices"] == [] and ev[-1]["usage"]["completion_tokens"] >= 1


def test_ollama_routes(client):
    tags = client.get("/api/tags").json()
    assert tags["models"][0]["name"] == tags["models"][0]["model"] == "tiny"  # the name answers use too
    show = client.post("/api/show", json={"model": "tiny:latest"}).json()
    assert "{{ .Suffix }}" in show["template"] and "insert" in show["capabilities"]
    r = client.post(
        "/api/generate",
        json={"model": "tiny:latest", "prompt": "def f(", "suffix": ")", "options": {"num_predict": 3}, "stream": False},
    )
    assert r.json()["done"] is True and r.json()["eval_count"] <= 3
    with client.stream(
        "POST", "/api/generate", json={"model": "tiny", "prompt": "a", "raw": True, "options": {"num_predict": 3}}
    ) as r:
        lines = [json.loads(l) for l in r.iter_lines() if l]
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert lines[-1]["done"] is True and all(not l["done"] for l in lines[:-1])
    c = client.post(
        "/api/chat",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False, "options": {"num_predict": 2}},
    )
    assert c.json()["message"]["role"] == "assistant"


def test_ollama_num_predict_zero_is_no_limit_as_in_ollama(client):
    """`num_predict: 0` answered one token; Ollama's runners limit a sequence only when num_predict is above 0,
    so 0 generates as -1 (and -2) do: until the limit (64 here) or the stop token. Greedy, so the same answer."""

    def gen(n):
        body = {
            "model": "tiny",
            "prompt": "def f(",
            "raw": True,
            "stream": False,
            "options": {"temperature": 0, "num_predict": n},
        }
        return client.post("/api/generate", json=body).json()

    def chat(n):
        msgs = [{"role": "user", "content": "hi"}]
        body = {"model": "tiny", "messages": msgs, "stream": False, "options": {"temperature": 0, "num_predict": n}}
        return client.post("/api/chat", json=body).json()

    zero, unlimited, fill, three = gen(0), gen(-1), gen(-2), gen(3)
    assert zero["eval_count"] > 3 and three["eval_count"] <= 3
    assert (zero["response"], zero["eval_count"]) == (unlimited["response"], unlimited["eval_count"])
    assert (fill["response"], fill["eval_count"]) == (unlimited["response"], unlimited["eval_count"])
    zero, unlimited = chat(0), chat(-1)
    assert zero["eval_count"] > 3 and zero["message"] == unlimited["message"]


def test_infill_with_input_extra(client):
    r = client.post(
        "/infill",
        json={
            "input_prefix": "x = h(",
            "input_suffix": ")",
            "input_extra": [{"filename": "u.py", "text": "def h(a): return a"}],
            "n_predict": 3,
            "temperature": 0,
        },
    )
    body = r.json()
    assert r.status_code == 200 and body["stop"] is True and body["tokens_predicted"] <= 3
    # the cross-file snippet went into the prompt as the model's template expects
    assert (
        body["tokens_evaluated"]
        > client.post("/infill", json={"input_prefix": "x = h(", "input_suffix": ")", "n_predict": 1}).json()["tokens_evaluated"]
    )


def test_tabby_completion_and_events(client):
    r = client.post(
        "/v1/completions",
        json={
            "language": "python",
            "segments": {"prefix": "def f(", "suffix": ")", "filepath": "a.py"},
            "debug_options": {"return_prompt": True},
        },
    )
    body = r.json()
    assert r.status_code == 200 and body["id"].startswith("cmpl-") and "text" in body["choices"][0]
    assert body["debug_data"]["prompt"].startswith("<|fim_prefix|>def f(")
    assert client.post("/v1/events", json={"type": "select", "completion_id": body["id"]}).status_code == 200


# ---------------------------------------------------------------- errors ---
@pytest.mark.parametrize(
    "method, path, body, shape",
    [
        ("post", "/v1/completions", {"model": "tiny", "prompt": "x"}, "openai"),
        ("post", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}, "openai"),
        ("get", "/v1/models", None, "openai"),
        ("post", "/api/generate", {"model": "tiny", "prompt": "x"}, "ollama"),
        ("get", "/api/tags", None, "ollama"),
        ("post", "/infill", {"input_prefix": "x"}, "infill"),
        ("post", "/v1/completions", {"segments": {"prefix": "x"}}, "tabby"),
    ],
)
@pytest.mark.parametrize("auth", [None, "Bearer cm_not-a-real-token", "Basic abc"])
def test_unauthorized_in_each_shape(client, method, path, body, shape, auth):
    headers = {"Authorization": auth} if auth else {"Authorization": ""}
    r = getattr(client, method)(path, headers=headers, **({"json": body} if body else {}))
    assert r.status_code == 401
    err = r.json()["error"]
    if shape == "openai":
        assert err["code"] == "invalid_api_key" and "token" in err["message"]
    elif shape == "infill":
        assert err["code"] == 401
    else:
        assert isinstance(err, str) and "token" in err


def test_unknown_model(client):
    r = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/api/generate", json={"model": "llama3", "prompt": "x"})
    assert r.status_code == 404 and "not found" in r.json()["error"]


def test_prompt_longer_than_context(client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "def " * 700, "max_tokens": 8})
    err = r.json()["error"]
    assert r.status_code == 400 and "512" in err["message"] and "max_tokens is 8" in err["message"]
    # Ollama keeps the end of an over-long prompt instead (tests/serve/test_prompts.py)
    r = client.post("/api/generate", json={"model": "tiny", "prompt": "def " * 700, "raw": True, "stream": False})
    assert r.status_code == 200 and r.json()["prompt_eval_count"] < 512


def test_max_tokens_bounded_by_configuration(client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 100000})
    assert r.status_code == 400 and "limit of 64" in r.json()["error"]["message"]


@pytest.mark.parametrize("raw", [b"{bad", b"", b"[1,2]", b'"text"'])
def test_malformed_json(client, raw):
    for path in ("/v1/completions", "/api/generate", "/infill", "/v1/chat/completions"):
        r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (path, r.text)
        assert "JSON" in r.text or "body" in r.text
    assert client.get("/health").status_code == 200


def test_validation_errors_are_400_in_shape(client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": 2})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400
    r = client.post("/api/chat", json={"model": "tiny", "messages": [{"content": "no role"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]


def test_scopes(client):
    r = client.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": "x", "max_tokens": 1},
        headers={"Authorization": f"Bearer {client.chat_only}"},
    )
    assert r.status_code == 403 and "complete" in r.json()["error"]["message"]
    r = client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
        headers={"Authorization": f"Bearer {client.chat_only}"},
    )
    assert r.status_code == 200


def test_revoked_token_stops_working(client):
    info, tok = client.accounts.create_token("carol")
    h = {"Authorization": f"Bearer {tok}"}
    assert client.get("/v1/models", headers=h).status_code == 200
    client.accounts.revoke_token(info.id)
    r = client.get("/v1/models", headers=h)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]


def test_unloaded_model_is_503_in_each_shape(client, random_gguf):
    own = LlamaCppEngine.from_path(random_gguf, model_id="tiny", n_ctx=512, n_threads=1)
    client.holder.set(own)
    client.holder.unload("license lease expired")  # closes `own`, as a lapsed lease does
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 503 and "lease expired" in r.json()["error"]["message"]
    r = client.post("/api/generate", json={"model": "tiny", "prompt": "x", "suffix": ""})
    assert r.status_code == 503 and "lease expired" in r.json()["error"]
    r = client.post("/v1/completions", json={"segments": {"prefix": "x"}})
    assert r.status_code == 503 and "lease expired" in r.json()["error"]
    assert client.get("/health").status_code == 503
    client.holder.set(LlamaCppEngine.from_path(random_gguf, model_id="tiny", n_ctx=512, n_threads=1))
    assert client.get("/health").status_code == 200


def test_admission_queue_waits_and_returns_slots(random_gguf):
    """With max_concurrent=1, concurrent requests wait their turn, all succeed, and no slot leaks."""
    import asyncio

    import httpx

    settings = load_settings(**{"server.max_concurrent": 1})
    accounts = Accounts(open_db())
    holder = ModelHolder("tiny")
    holder.set(LlamaCppEngine.from_path(random_gguf, model_id="tiny", n_ctx=512, n_threads=1))
    app = create_app(settings, holder=holder, accounts=accounts)
    _, tok = accounts.create_token("alice")
    svc = app.state.service
    peak = []

    async def watch():
        while True:
            peak.append(svc.waiting)
            await asyncio.sleep(0.001)

    async def go():
        w = asyncio.create_task(watch())
        try:
            return await requests()
        finally:
            w.cancel()

    async def requests():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers={"Authorization": f"Bearer {tok}"}) as c:

            async def one(i):
                r = await c.post("/v1/completions", json={"model": "tiny", "prompt": f"x{i}", "max_tokens": 8, "temperature": 0})
                return r.status_code, r.text

            return await asyncio.gather(*(one(i) for i in range(6)))

    codes = asyncio.run(go())
    assert [c for c, _ in codes] == [200] * 6, codes
    assert max(peak) >= 1  # someone waited for the single slot
    assert svc.waiting == 0 and svc._slots.busy == 0 and not svc._slots.held
    holder.close()


def test_license_features_are_enforced(client):
    """A license that grants only `complete` refuses chat (403 in the protocol's shape) and retrieval."""
    from codemoat.engines.holder import LicenseStatus

    client.holder.status.license = LicenseStatus(
        license_id="L",
        customer="acme",
        license_mode="offline",
        license_expires="",
        license_expires_at=0.0,
        features=["complete"],
        machine_id="m",
        model_file_id="f",
        format="gguf",
        non_dumpable=True,
    )
    try:
        r = client.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        )
        assert r.status_code == 403 and "license does not include 'chat'" in r.json()["error"]["message"]
        r = client.post("/api/chat", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": False})
        assert r.status_code == 403 and "chat" in r.json()["error"]
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "suffix": "", "max_tokens": 1})
        assert r.status_code == 200
    finally:
        client.holder.status.license = None
    assert (
        client.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        ).status_code
        == 200
    )
