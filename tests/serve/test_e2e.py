"""End to end: `codemoat serve` as a subprocess on a free loopback port, driven by real clients."""

import json
import signal

import httpx
import openai
import pytest

from conftest import create_token, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def server(serve_process, tiny_gguf):
    token = create_token("--name", "e2e")
    s = serve_process(["--model", str(tiny_gguf), "--model-id", "codemoat-tiny"])
    s.token = token
    return s


def test_openai_client_completion_with_suffix_and_streamed_chat(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.token, max_retries=0)
    assert [m.id for m in client.models.list()] == ["codemoat-tiny"]
    c = client.completions.create(
        model="codemoat-tiny", prompt="def add(a, b):\n    return ", suffix="\n", max_tokens=16, temperature=0
    )
    assert c.choices[0].finish_reason in ("stop", "length") and c.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model="codemoat-tiny",
        messages=[{"role": "user", "content": "What does os.path.join do?"}],
        max_tokens=24,
        stream=True,
        temperature=0,
    )  # sampled, the model sometimes ends at once (~1 in 6 runs)
    pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert len(pieces) >= 2 and "".join(pieces)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="cm_wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="codemoat-tiny", prompt="x = 1\n" * 5000, max_tokens=4)


def test_ollama_autocomplete_as_continue_sends_it(server):
    h = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(base_url=server.url, headers=h, timeout=60) as c:
        show = c.post("/api/show", json={"name": "codemoat-tiny"}).json()
        assert ".Suffix" in show["template"]
        body = {
            "model": "codemoat-tiny",
            "prompt": "import os\n\ndef cwd():\n    return ",
            "suffix": "\n",
            "raw": True,
            "options": {"temperature": 0.01, "num_predict": 16, "stop": ["\n\n"]},
            "keep_alive": 1800,
        }
        with c.stream("POST", "/api/generate", json=body) as r:
            assert r.status_code == 200
            lines = [json.loads(l) for l in r.iter_lines() if l]
        assert lines[-1]["done"] and lines[-1]["eval_count"] >= 1


def test_infill_and_tabby(server):
    h = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(base_url=server.url, headers=h, timeout=60) as c:
        r = c.post(
            "/infill",
            json={
                "input_prefix": "import os\nprint(os.",
                "input_suffix": ")\n",
                "n_predict": 8,
                "input_extra": [{"filename": "util.py", "text": "def helper():\n    pass\n"}],
            },
        )
        assert r.status_code == 200 and r.json()["stop"] is True
        assert c.get("/v1/health").status_code == 200
        health = c.get("/health").json()  # a plaintext model: its file, and no license to show
        assert health["license"] is None and health["model_file"]["path"].endswith("codemoat-tiny.gguf")
        assert health["bundle"] is None  # served by path, not an installed update bundle
        t = c.post(
            "/v1/completions",
            json={
                "language": "python",
                "segments": {
                    "prefix": "def f():\n    return ",
                    "suffix": "\n",
                    "filepath": "a.py",
                    "git_url": "https://example.invalid/acme.git",
                },
            },
        )
        assert t.status_code == 200 and t.json()["choices"][0]["index"] == 0
        assert c.post("/v1/events", json={"type": "view", "completion_id": t.json()["id"], "choice_index": 0}).status_code == 200


def test_negative_cases_keep_the_server_serving(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/v1/completions", json={"model": "codemoat-tiny", "prompt": "x"}).status_code == 401
        assert c.post(
            "/api/generate", json={"model": "codemoat-tiny", "prompt": "x"}, headers={"Authorization": "Bearer nope"}
        ).json()["error"]
        h = {"Authorization": f"Bearer {server.token}"}
        assert c.post("/v1/completions", content=b"{not json", headers=h).status_code == 400
        assert c.post("/api/generate", json={"model": "other", "prompt": "x"}, headers=h).status_code == 404
        assert c.post("/infill", json={"input_prefix": "x", "n_indent": -1}, headers=h).status_code == 400
        # an over-long infill prompt is fitted, as llama.cpp's server does, and the answer says so
        r = c.post("/infill", json={"input_prefix": "x " * 20000, "n_predict": 4}, headers=h)
        assert r.status_code == 200 and r.json()["truncated"] is True
        assert (
            c.post("/v1/completions", json={"model": "codemoat-tiny", "prompt": "x", "max_tokens": 1}, headers=h).status_code
            == 200
        )


def test_client_disconnect_cancels_generation(server):
    """A client that goes away mid-stream frees the worker: the next request is answered at once."""
    h = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(base_url=server.url, headers=h, timeout=60) as c:
        with c.stream(
            "POST",
            "/v1/completions",
            json={"model": "codemoat-tiny", "prompt": "def ", "max_tokens": 1000, "stream": True, "temperature": 1},
        ) as r:
            next(r.iter_lines())
        r = c.post("/v1/completions", json={"model": "codemoat-tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200


def test_cli_clients_and_graceful_shutdown(server):
    env = {"CODEMOAT_URL": server.url, "CODEMOAT_TOKEN": server.token}
    r = run_cli("complete", "--prefix", "def add(a, b):\n    return ", "--suffix", "\n", "--max-tokens", "8", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["object"] == "text_completion"
    r = run_cli("chat", "hello", "--max-tokens", "8", env=env)
    assert r.returncode == 0, r.stderr
    r = run_cli("complete", "--prefix", "x", env={**env, "CODEMOAT_TOKEN": "cm_bad"})
    assert r.returncode == 1 and "401" in r.stderr and "Traceback" not in r.stderr
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    assert "Application shutdown complete" in server.output()


@pytest.mark.parametrize("quant", ["Q4_0", "Q8_0", "wide-Q4_K_M"])  # all five types: tests/engines/test_cpu.py
def test_quantised_models_serve_on_the_path_the_self_test_chose(quant, quantised, wide_q4_k_m, serve_process):
    """Every quantised GGUF serves (issue 12: on AMX Xeons each one used to kill the server in llama_decode);
    /health says which llama.cpp CPU path is in use and why."""
    model = wide_q4_k_m if quant.startswith("wide") else quantised(quant)
    token = create_token("--name", "quant")
    s = serve_process(["--model", str(model), "--model-id", "q"])
    client = openai.OpenAI(base_url=s.url + "/v1", api_key=token, max_retries=0)
    c = client.completions.create(model="q", prompt="def add(a, b):\n    return", max_tokens=8, temperature=0)
    assert c.usage.completion_tokens >= 1
    cpu = httpx.get(s.url + "/health", headers={"Authorization": f"Bearer {token}"}).json()["engine"]["cpu_buffers"]
    assert cpu["path"] in ("extra", "safe") and cpu["reason"]
    assert ("self-test passed" in cpu["reason"]) == (cpu["path"] == "extra")


def test_a_crashing_self_test_serves_on_the_safe_path(quantised, serve_process):
    """The self-test's child dies with SIGSEGV (forced): the server says so in one line and serves anyway."""
    token = create_token("--name", "quant")
    s = serve_process(["--model", str(quantised("Q4_K_M")), "--model-id", "q"], env={"CODEMOAT_CPU_SELFTEST_FAULT": "segv"})
    client = openai.OpenAI(base_url=s.url + "/v1", api_key=token, max_retries=0)
    assert (
        client.completions.create(
            model="q", prompt="def add(a, b):\n    return", max_tokens=8, temperature=0
        ).usage.completion_tokens
        >= 1
    )
    cpu = httpx.get(s.url + "/health", headers={"Authorization": f"Bearer {token}"}).json()["engine"]["cpu_buffers"]
    assert cpu["path"] == "safe" and "crashed a Q4_0 decode with SIGSEGV" in cpu["reason"]
    assert [l for l in s.output().splitlines() if "SIGSEGV" in l] == [f"WARNING:     {cpu['reason']}"]


@pytest.mark.parametrize("path", ["safe", "extra"])
def test_the_operators_cpu_buffers_setting_reaches_the_engine(path, quantised, serve_process):
    """`model.cpu_buffers = safe` is what an operator sets on a CPU where llama.cpp's extra buffer types
    crash: the served engine must take it as given, not run the self-test and choose for itself."""
    token = create_token("--name", "quant")
    s = serve_process(["--model", str(quantised("Q4_0")), "--model-id", "q"], env={"CODEMOAT_MODEL__CPU_BUFFERS": path})
    cpu = httpx.get(s.url + "/health", headers={"Authorization": f"Bearer {token}"}).json()["engine"]["cpu_buffers"]
    assert cpu == {"path": path, "reason": f"model.cpu_buffers = {path}"}


def test_serve_errors_are_one_line(tmp_path):
    r = run_cli("serve", "--model", str(tmp_path / "missing.gguf"), "--port", "0")
    assert r.returncode == 1 and "model not found" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad.gguf").write_bytes(b"not a model")
    r = run_cli("serve", "--model", str(tmp_path / "bad.gguf"), "--port", "0")
    assert r.returncode == 1 and "cannot load model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
