"""Bad input against a real server on 127.0.0.1: each protocol answers in its own shape, never a 500,
never a stalled server; a client that hangs up frees the worker."""

import json
import threading
import time

import httpx
import openai
import pytest

from conftest import ServerProcess, create_token, run_cli

pytestmark = pytest.mark.slow


def _server(tmp_path_factory, model, env: dict) -> ServerProcess:
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CODEMOAT_HOME", str(home))
        for k, v in env.items():
            mp.setenv(k, v)
        token = create_token("--name", "sweep")
        s = ServerProcess(["--model", str(model), "--model-id", "m"])
    s.token, s.home = token, home
    return s


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gguf):
    """The bundled model (context 512, below the default max_tokens limit of 1024), secrets blocked."""
    s = _server(tmp_path_factory, tiny_gguf, {"CODEMOAT_POLICY__SECRETS": "block"})
    yield s
    s.stop()


@pytest.fixture
def c(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=60) as client:
        yield client
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_empty_prompt_is_a_400_not_a_500(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.token, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="prompt is empty"):
        client.completions.create(model="m", prompt="", max_tokens=2)


@pytest.mark.parametrize("path, shape", [("/v1/completions", dict), ("/api/generate", str), ("/infill", dict)])
def test_deeply_nested_json_is_a_400(c, path, shape):
    r = c.post(path, content=b'{"prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}", headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert isinstance(r.json()["error"], shape) and "nested too deeply" in r.text


def test_huge_prompt_is_refused_from_its_beginning(server, c):
    """A prompt far past the context is refused from its first n_ctx*16 characters ("more than N
    tokens"), or fitted from its last ones, never tokenised whole (a 10 MB prompt held the event loop ~11 s)."""
    big = "a" * (4 * 1024 * 1024)
    answers = {}

    def send(path, body):
        answers[path] = c.post(path, json=body)

    threads = [
        threading.Thread(target=send, args=a)
        for a in (
            ("/v1/completions", {"model": "m", "prompt": big, "max_tokens": 1}),
            ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": big}], "max_tokens": 1}),
            ("/api/generate", {"model": "m", "prompt": big, "raw": True, "stream": False, "options": {"num_predict": 1}}),
        )
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r = answers["/v1/completions"]  # OpenAI refuses an over-long prompt
    assert r.status_code == 400 and "prompt is more than" in r.text and "context is 512 tokens" in r.text, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    # chat and Ollama keep the end of it instead, cut to n_ctx*16 characters before tokenising
    for path in ("/v1/chat/completions", "/api/generate"):
        assert answers[path].status_code == 200, (path, answers[path].text)


@pytest.mark.parametrize("path, shape", [("/v1/completions", dict), ("/api/generate", str), ("/infill", dict)])
def test_body_over_the_limit_is_a_413_before_anything_reads_it(c, path, shape):
    body = b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'  # the default limit is 8 MiB
    r = c.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and isinstance(r.json()["error"], shape) and "server.max_body_mb" in r.text, r.text

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b"a" * (1024 * 1024)

    r = c.post(path, content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "server.max_body_mb" in r.text, r.text


def test_bodies_refused_as_too_large_are_audited(server, c):
    before = _audited(server, 413)
    assert c.post("/v1/completions", content=b"a" * (9 * 1024 * 1024)).status_code == 413
    assert c.post("/v1/completions", content=iter([b"a" * (1024 * 1024)] * 10)).status_code == 413
    assert _audited(server, 413) == before + 2  # one record per API request, refused ones too


def _audited(server, status: int) -> int:
    out = run_cli("audit", "export", "--kind", "request", env={"CODEMOAT_HOME": str(server.home)})
    assert out.returncode == 0, out.stderr
    return sum(1 for x in map(json.loads, out.stdout.splitlines()) if x["status"] == status)


def test_minus_one_and_above_limit_fit_the_context(c):
    """Ollama's num_predict -1 and llama.cpp's n_predict -1 mean "until the limit or a full context";
    with the limit (1024) above the context (512) they were a 400 for every prompt."""
    for n in (-1, -2, 10**9):
        r = c.post(
            "/api/generate",
            json={
                "model": "m",
                "prompt": "def f(",
                "raw": True,
                "stream": False,
                "options": {"num_predict": n, "temperature": 0},
            },
        )
        assert r.status_code == 200 and r.json()["done"] is True, (n, r.text)
    for n in (-1, 10**9):
        r = c.post("/infill", json={"input_prefix": "def f(", "input_suffix": ")", "n_predict": n})
        assert r.status_code == 200 and r.json()["stop"] is True, (n, r.text)
    r = c.post(
        "/api/chat",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False, "options": {"num_predict": -1}},
    )
    assert r.status_code == 200, r.text


def test_ollama_empty_prompt_or_messages_load_the_model(c):
    r = c.post("/api/generate", json={"model": "m"})
    assert r.status_code == 200 and r.json()["done_reason"] == "load" and r.json()["response"] == ""
    r = c.post("/api/chat", json={"model": "m", "messages": []})
    assert r.status_code == 200 and r.json()["done_reason"] == "load" and r.json()["message"]["content"] == ""
    assert c.post("/api/chat", json={"model": "other", "messages": []}).status_code == 404


def test_openai_token_is_checked_before_the_body_and_routes_are_not_models(server):
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.post(server.url + path, content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
    h = {"Authorization": f"Bearer {server.token}"}
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "m", "input": "x"}, headers=h)
    err = r.json()["error"]
    assert r.status_code == 404 and err["code"] != "model_not_found" and "/v1/embeddings" in err["message"]
    r = httpx.get(server.url + "/v1/chat/completions", headers=h)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """A random-weight model that greedily never stops: 6000 tokens take seconds."""
    from tinymodel import build_tiny_gguf

    model = build_tiny_gguf(tmp_path_factory.mktemp("slow") / "slow.gguf", n_layer=4, n_embd=256, n_ctx=8192, seed=2)
    s = _server(tmp_path_factory, model, {"CODEMOAT_MODEL__MAX_TOKENS_LIMIT": "8000", "CODEMOAT_MODEL__N_CTX": "8192"})
    yield s
    s.stop()


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"model": "m", "prompt": "def f", "max_tokens": 6000, "temperature": 0}),
        (
            "/api/generate",
            {"model": "m", "prompt": "def f", "raw": True, "stream": False, "options": {"num_predict": 6000, "temperature": 0}},
        ),
    ],
)
def test_client_gone_before_a_whole_answer_frees_the_worker(slow_server, path, body):
    """Editors cancel completions as the user types (Tabby's are never streamed): the generation stops."""
    h = {"Authorization": f"Bearer {slow_server.token}"}
    # warm the engine process first, so that the abandoned request has generated tokens by the hang-up
    assert (
        httpx.post(
            slow_server.url + "/v1/completions", json={"model": "m", "prompt": "y", "max_tokens": 2}, headers=h, timeout=60
        ).status_code
        == 200
    )
    with pytest.raises(httpx.TimeoutException):
        httpx.post(slow_server.url + path, json=body, headers=h, timeout=1.5)
    r = httpx.post(
        slow_server.url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2}, headers=h, timeout=60
    )
    assert r.status_code == 200
    # the audit log says what became of the abandoned request: cut off (499) after some tokens and long
    # before its 6000; without the cancellation it ran them all for nobody and was recorded as a 200
    for _ in range(100):
        out = run_cli("audit", "export", "--kind", "request", env={"CODEMOAT_HOME": str(slow_server.home)})
        gone = [x for x in map(json.loads, out.stdout.splitlines()) if x["route"] == path and x["status"] == 499]
        if gone:
            break
        time.sleep(0.1)
    assert gone and 0 < gone[-1]["completion_tokens"] < 6000, out.stdout[-2000:]


def test_ollama_chat_without_a_model_is_refused_even_when_empty(c):
    for body in ({"messages": []}, {"messages": [{"role": "user", "content": "hi"}]}):
        r = c.post("/api/chat", json=body)
        assert r.status_code == 400 and "model" in r.json()["error"], (body, r.text)


def test_null_parameters_take_their_defaults_where_the_reference_servers_do(c):
    """Was (an outside fuzzer): `"temperature": null` (and top_p, n, stream, echo, Ollama's options and stream) was
    a 400, where OpenAI documents each as "or null" and Ollama's Go server reads null as not given. Now each takes
    its default. The negatives: a required field sent as null (`model`) is still refused in the protocol's shape,
    and so is a top_k llama.cpp's int32 cannot hold (2**32 was read as 0: top-k off, silently)."""
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "max_tokens": 2}
    r = c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}], **nulls})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text
    r = c.post("/v1/completions", json={"model": "m", "prompt": "def f(", "echo": None, **nulls})
    assert r.status_code == 200 and r.json()["object"] == "text_completion", r.text
    r = c.post("/api/generate", json={"model": "m", "prompt": "def f(", "options": None, "stream": None, "raw": None})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson"), r.text  # streamed
    r = c.post(
        "/api/chat",
        json={
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
            "options": {"temperature": None, "num_predict": 2},
        },
    )
    assert r.status_code == 200 and r.json()["done"] is True, r.text
    r = c.post("/v1/completions", json={"model": None, "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error" and "model" in r.text, r.text
    r = c.post("/api/generate", json={"model": "m", "prompt": "x", "stream": False, "options": {"top_k": 2**32}})
    assert r.status_code == 400 and isinstance(r.json()["error"], str) and "top_k" in r.text, r.text
    r = c.post("/infill", json={"input_prefix": "x", "n_predict": 2, "top_k": 2**31})
    assert r.status_code == 400 and "top_k" in r.text, r.text
