"""What editor clients read and send, through the real app (TestClient) over the bundled model:
llama.vscode's /infill fields and line rules, chat without a limit, models.retrieve, one model
name across Ollama's routes, and OpenAI's error codes with `param`."""

import json

import pytest
from fastapi.testclient import TestClient

from codemoat.accounts import Accounts
from codemoat.config import load_settings
from codemoat.db import open_db
from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.serve.app import create_app
from kept_holder import KeptHolder

N_CTX = 1024


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    e = LlamaCppEngine.from_path(tiny_gguf, model_id="tiny", n_ctx=N_CTX, n_threads=1)
    yield e
    e.close()


@pytest.fixture
def client(engine):
    accounts = Accounts(open_db())
    holder = KeptHolder("tiny")
    holder.set(engine)
    app = create_app(load_settings(), holder=holder, accounts=accounts)
    _, tok = accounts.create_token("alice")
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {tok}"
        c.n_ctx = engine.n_ctx  # the model's own context when it is below N_CTX
        yield c


# ----------------------------------------------------------------- /infill ---
def _check_infill_fields(body, n_predict, n_ctx):
    gs = body["generation_settings"]
    assert gs["n_ctx"] == n_ctx and gs["n_predict"] == n_predict and gs["model"] == "tiny"
    assert gs["temperature"] == 0 and gs["top_k"] == 40 and isinstance(gs["stop"], list)
    t = body["timings"]
    assert t["prompt_n"] == body["tokens_evaluated"] > 0 and t["predicted_n"] == body["tokens_predicted"] > 0
    assert t["prompt_ms"] > 0 and t["predicted_ms"] > 0
    assert t["predicted_per_second"] == pytest.approx(1e3 * t["predicted_n"] / t["predicted_ms"])
    assert t["prompt_per_token_ms"] == pytest.approx(t["prompt_ms"] / t["prompt_n"])
    assert body["tokens_cached"] == body["tokens_evaluated"] + body["tokens_predicted"]
    assert body["truncated"] is False


LLAMA_VSCODE = {  # llama.vscode's request shape (its src/llama-server.ts)
    "input_prefix": "import os\n\ndef cwd():\n",
    "input_suffix": "\n",
    "prompt": "    return ",
    "input_extra": [{"filename": "util.py", "text": "def helper():\n    pass\n"}],
    "n_predict": 16,
    "top_k": 40,
    "top_p": 0.99,
    "stream": False,
    "samplers": ["top_k", "top_p", "infill"],
    "cache_prompt": True,
    "t_max_prompt_ms": 500,
    "t_max_predict_ms": 1000,
    "n_indent": 0,
    "temperature": 0,
}


def test_infill_answer_has_what_llama_vscode_reads(client):
    r = client.post("/infill", json=LLAMA_VSCODE)
    assert r.status_code == 200, r.text
    body = r.json()
    _check_infill_fields(body, 16, client.n_ctx)
    assert body["generation_settings"]["t_max_predict_ms"] == 1000


def test_infill_over_long_prompt_is_fitted_and_says_so(client):
    body = client.post("/infill", json={**LLAMA_VSCODE, "input_prefix": "x = 1\n" * 2000, "n_predict": 8}).json()
    assert body["truncated"] is True and body["tokens_evaluated"] + body["tokens_predicted"] <= client.n_ctx, body


def test_infill_stream_ends_with_the_same_fields(client):
    with client.stream("POST", "/infill", json={**LLAMA_VSCODE, "stream": True}) as r:
        events = [json.loads(l[6:]) for l in r.iter_lines() if l.startswith("data: ")]
    assert all(not e["stop"] for e in events[:-1]) and events[-1]["stop"] is True
    _check_infill_fields(events[-1], 16, client.n_ctx)
    assert events[-1]["generation_settings"]["stream"] is True


def test_infill_n_predict_zero_is_a_warm_up(client):
    r = client.post("/infill", json={**LLAMA_VSCODE, "n_predict": 0})
    body = r.json()
    assert r.status_code == 200, body
    assert body["content"] == "" and body["tokens_predicted"] == 0 and body["timings"]["predicted_n"] == 0
    assert body["generation_settings"]["n_predict"] == 0 and body["tokens_evaluated"] > 0
    # the same request with a limit does generate (the warm-up is not just an empty model)
    assert client.post("/infill", json={**LLAMA_VSCODE, "n_predict": 8}).json()["tokens_predicted"] > 0


# greedy, the bundled model continues this with several lines
CLASS = {"input_prefix": "class Stack:\n    def __init__(self):\n        ", "input_suffix": "", "n_predict": 48, "temperature": 0}


def test_infill_n_indent_stops_a_line_indented_less(client):
    free = client.post("/infill", json=CLASS).json()["content"]
    lines = free.split("\n")
    if len(lines) < 2 or not lines[1].strip():
        pytest.skip(f"this model's completion has no second line to check: {free!r}")
    indent = len(lines[1]) - len(lines[1].lstrip(" \t"))
    # one more than the second line has: it is cut before its first character (the first line never is)
    body = client.post("/infill", json={**CLASS, "n_indent": indent + 1}).json()
    assert body["content"] == free[: len(lines[0]) + 1 + indent]
    assert body["stop_type"] == "limit" and body["generation_settings"]["n_indent"] == indent + 1
    # as much indentation as the lines have: nothing is cut
    assert client.post("/infill", json={**CLASS, "n_indent": indent}).json()["content"] == free


def test_infill_time_limit_reaches_the_engine(client):
    # a limit already past: the completion ends with its first line (the first token holding a newline)
    free = client.post("/infill", json=CLASS).json()["content"]
    assert free.count("\n") >= 2, free
    body = client.post("/infill", json={**CLASS, "t_max_predict_ms": 0.001}).json()
    assert body["content"] == free[: free.index("\n") + 1] and body["stop_type"] == "limit"


def test_infill_bad_line_rules_are_400(client):
    for bad in ({"n_indent": -1}, {"t_max_predict_ms": -5}, {"n_predict": -2}):
        r = client.post("/infill", json={**CLASS, **bad})
        assert r.status_code == 400 and r.json()["error"]["code"] == 400, r.text


# -------------------------------------------------------------- chat limit ---
def test_chat_without_max_tokens_is_not_cut_at_the_completion_default(client):
    """No limit: the answer runs to its stop token (or the context), not to model.default_max_tokens (64)."""
    msgs = [{"role": "user", "content": "Write a Python class for a stack with push, pop, peek and size methods."}]
    body = client.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "temperature": 0}).json()
    assert body["usage"]["completion_tokens"] > 64 or body["choices"][0]["finish_reason"] == "stop", body["usage"]
    # the FIM default stays small: a completion without max_tokens still stops at 64
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "def f(x):\n", "suffix": "\n", "temperature": 0})
    assert r.json()["usage"]["completion_tokens"] <= 64


def test_ollama_chat_without_num_predict_is_not_cut_either(client):
    msgs = [{"role": "user", "content": "Write a Python class for a stack with push, pop, peek and size methods."}]
    body = client.post(
        "/api/chat", json={"model": "tiny", "messages": msgs, "stream": False, "options": {"temperature": 0}}
    ).json()
    assert body["eval_count"] > 64 or body["done_reason"] == "stop", body


# ------------------------------------------------------------ model names ---
def test_models_retrieve_and_its_404(client):
    r = client.get("/v1/models/tiny")
    assert r.status_code == 200 and r.json() == {
        "id": "tiny",
        "object": "model",
        "created": r.json()["created"],
        "owned_by": "codemoat",
    }
    r = client.get("/v1/models/gpt-4o")
    err = r.json()["error"]
    assert r.status_code == 404 and err["code"] == "model_not_found" and err["type"] == "invalid_request_error"
    assert client.get("/v1/models/tiny", headers={"Authorization": "Bearer cm_wrong"}).status_code == 401


def test_one_model_name_across_ollama_routes(client):
    name = client.get("/api/tags").json()["models"][0]["name"]
    for asked in (name, f"{name}:latest"):
        assert client.post("/api/show", json={"model": asked}).status_code == 200
        r = client.post(
            "/api/generate", json={"model": asked, "prompt": "x", "raw": True, "stream": False, "options": {"num_predict": 2}}
        )
        assert r.json()["model"] == name
    assert client.post("/api/show", json={"model": f"{name}:7b"}).status_code == 404


# ------------------------------------------------------------ error codes ---
@pytest.mark.parametrize(
    "path, body, code, param",
    [
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
            "invalid_value",
            "messages[0].role",
        ),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, "empty_array", "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "missing_required_parameter", "model"),
        ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, "invalid_type", "messages"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 2.5},
            "decimal_above_max_value",
            "temperature",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, "integer_below_min_value", "max_tokens"),
        # asked for 0 tokens, it used to answer 200 with one (service.params' floor of 1); OpenAI refuses 0
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, "integer_below_min_value", "max_tokens"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
            "integer_below_min_value",
            "max_completion_tokens",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 2}, "integer_above_max_value", "n"),
    ],
)
def test_openai_errors_have_openai_codes_and_param(client, path, body, code, param):
    r = client.post(path, json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "invalid_request_error"
    assert (err["code"], err["param"]) == (code, param), err
    assert param in err["message"]


def test_a_prompt_over_the_context_names_it_as_openai_does(client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "def " * 3000, "max_tokens": 8})
    err = r.json()["error"]
    assert r.status_code == 400 and (err["code"], err["param"]) == ("context_length_exceeded", "prompt"), err


def test_errors_without_a_parameter_have_null_code_and_param(client):
    r = client.post("/v1/chat/completions", content=b"{bad", headers={"Content-Type": "application/json"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] is None and err["param"] is None and err["type"] == "invalid_request_error"
    r = client.post("/v1/nothing-here", json={})
    err = r.json()["error"]
    assert r.status_code == 404 and err["code"] is None and "Invalid URL" in err["message"]
