"""Clients nobody on the project wrote, against a real `codemoat serve` on loopback: Tabby's
`tabby-agent` 1.5.0 in its JSON-lines mode (as vim-tabby and IntelliJ run it), the `ollama` and
`openai` npm libraries (tests/clients/node, pinned by its lock file; `make install` runs npm ci),
and the Python `openai` library's models.retrieve and chat stream helper."""

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import openai
import pytest

from conftest import create_token, run_cli

pytestmark = pytest.mark.slow

NODE_DIR = Path(__file__).parent / "node"
MODEL = "codemoat-tiny"


@pytest.fixture(scope="module")
def node() -> str:
    """The `node` binary (the test skips, saying why, when there is none) with the pinned clients installed."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the npm clients (tabby-agent, ollama, openai) cannot run")
    assert (NODE_DIR / "node_modules" / "tabby-agent").is_dir(), (
        "the npm clients are not installed: run `make install` (npm ci --prefix tests/clients/node)"
    )
    return node


@pytest.fixture
def server(serve_process, tiny_gguf):
    token = create_token("--name", "clients")
    s = serve_process(["--model", str(tiny_gguf), "--model-id", MODEL])
    s.token = token
    return s


def _run_node(node: str, script: str, server, tmp_path) -> dict:
    env = dict(os.environ, CODEMOAT_URL=server.url, CODEMOAT_TOKEN=server.token, CODEMOAT_MODEL=MODEL, HOME=str(tmp_path))
    r = subprocess.run([node, script], cwd=NODE_DIR, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ tabby ---
class TabbyAgent:
    """`tabby-agent` (no --lsp): JSON lines `[id, {"func": name, "args": [...]}]` in, `[id, result]` out;
    events arrive as `[0, event]`. HOME is a temporary folder (the agent keeps its config there)."""

    def __init__(self, node: str, home: Path):
        cli = NODE_DIR / "node_modules" / "tabby-agent" / "dist" / "cli.js"
        self.proc = subprocess.Popen(
            [node, str(cli)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=dict(os.environ, HOME=str(home)),
        )
        self.lines: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self.next_id = 1
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                pass

    def call(self, func: str, *args, timeout: float = 60):
        rid, self.next_id = self.next_id, self.next_id + 1
        self.proc.stdin.write(json.dumps([rid, {"func": func, "args": list(args)}]) + "\n")
        self.proc.stdin.flush()
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                msg = self.lines.get(timeout=max(0.1, deadline - time.time()))
            except queue.Empty:
                break
            if msg[0] == 0:
                self.events.append(msg[1])
            elif msg[0] == rid:
                return msg[1]
        raise AssertionError(f"tabby-agent did not answer {func} within {timeout}s")

    def initialize(self, url: str, token: str):
        return self.call(
            "initialize",
            {
                "config": {
                    "server": {"endpoint": url, "token": token},
                    "anonymousUsageTracking": {"disable": True},
                    "logs": {"level": "silent"},
                },
                "clientProperties": {"session": {"client": "codemoat-tests"}, "user": {}},
            },
        )

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _audited_events() -> list[str]:
    r = run_cli("audit", "export")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    return [(rec.get("detail") or {}).get("event") for rec in records if (rec.get("detail") or {}).get("event")]


def test_tabby_agent_json_lines(node, server, tmp_path):
    agent = TabbyAgent(node, tmp_path)
    try:
        assert agent.initialize(server.url, server.token) is True
        assert agent.call("getStatus") == "ready"
        text = "import os\n\ndef cwd():\n    return \n"
        done = agent.call(
            "provideCompletions",
            {
                "filepath": str(tmp_path / "a.py"),
                "language": "python",
                "text": text,
                "position": text.index("return ") + 7,
                "manually": True,
            },
        )
        assert done["id"].startswith("cmpl-") and isinstance(done["choices"], list), done
        for kind in ("view", "select", "dismiss"):
            assert agent.call("postEvent", {"type": kind, "completion_id": done["id"], "choice_index": 0}) is True, kind
        assert agent.call("getStatus") == "ready"
    finally:
        agent.close()
    # the server received all three (Tabby's agent sends them as POST /v1/events)
    assert {"view", "select", "dismiss"} <= set(_audited_events())


def test_tabby_agent_with_a_wrong_token_reports_unauthorized(node, server, tmp_path):
    agent = TabbyAgent(node, tmp_path)
    try:
        agent.initialize(server.url, "cm_wrong-token")
        assert agent.call("getStatus") == "unauthorized"
        assert any(e.get("event") == "authRequired" for e in agent.events) or any(
            e.get("status") == "unauthorized" for e in agent.events
        ), agent.events
    finally:
        agent.close()


# ---------------------------------------------------------------- npm libs ---
def test_ollama_js(node, server, tmp_path):
    out = _run_node(node, "ollama_client.mjs", server, tmp_path)
    assert out["tags"] == [MODEL]
    assert ".Suffix" in out["show"]["template"] and "insert" in out["show"]["capabilities"]
    g = out["generate"]
    assert g["done"] is True and g["model"] == MODEL and g["eval_count"] >= 1
    c = out["chat"]
    assert c["done"] is True and c["model"] == MODEL and c["pieces"] >= 2 and c["text"]
    assert out["wrong_token"]["status"] == 401
    n = out["num_predict"]  # 0 is no limit, as in Ollama (it answered one token): each answer runs to its line's end
    assert n["zero"] == n["unlimited"] and n["zero"]["chat_eval_count"] > 2
    assert n["two"]["chat_eval_count"] == 2 and n["two"]["eval_count"] <= 2


def test_openai_js(node, server, tmp_path):
    out = _run_node(node, "openai_client.mjs", server, tmp_path)
    assert out["completion"]["finish_reason"] in ("stop", "length") and out["completion"]["usage"]["completion_tokens"] >= 1
    assert out["chat"]["pieces"] >= 2 and out["chat"]["text"] and out["chat"]["finish_reason"] in ("stop", "length")
    assert out["retrieve"]["id"] == MODEL and out["retrieve"]["object"] == "model"
    assert out["retrieve_unknown"] == {
        "status": 404,
        "code": "model_not_found",
        "type": "invalid_request_error",
        "name": "NotFoundError",
    }
    assert out["bad_role"] == {
        "status": 400,
        "code": "invalid_value",
        "param": "messages[0].role",
        "type": "invalid_request_error",
    }


# ------------------------------------------------------------- Python SDK ---
def test_python_openai_models_retrieve_and_chat_without_a_limit(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.token, max_retries=0)
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    # No max_tokens, as `cn` sends it; the stream helper raises LengthFinishReasonError on a "length" finish.
    # The bundled model never ends a chat answer by itself: greedy, this answer reaches the client's stop
    # sequence after about 85 tokens, past the old default limit of 64.
    msgs = [{"role": "user", "content": "Write a class Point with x and y."}]
    with client.chat.completions.stream(
        model=MODEL, messages=msgs, temperature=0, stop=["\n    def "], stream_options={"include_usage": True}
    ) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    assert final.choices[0].finish_reason == "stop" and final.usage.completion_tokens > 64
