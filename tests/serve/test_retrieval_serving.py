"""Completions draw cross-file context from indexed repositories the caller may read — and only those."""

import pytest
from fastapi.testclient import TestClient

from codemoat.accounts import Accounts
from codemoat.config import load_settings
from codemoat.db import open_db
from codemoat.engines.holder import ModelHolder
from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.retrieve import Retriever
from codemoat.serve.app import create_app
from conftest import run_cli

LIB = '''"""Money helpers."""


def cents_to_display(cents: int, currency: str = "EUR") -> str:
    """Format an amount in cents for people."""
    return f"{cents / 100:.2f} {currency}"
'''
APP = """from billing.money import cents_to_display


def invoice_line(item, cents):
    return item + ": " + cents_to_display(cents)
"""


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "payments"
    (root / "billing").mkdir(parents=True)
    (root / "billing" / "money.py").write_text(LIB)
    (root / "billing" / "__init__.py").write_text("")
    (root / "app.py").write_text(APP)
    r = run_cli("index", "add", str(root), "--name", "payments", "--groups", "payments")
    assert r.returncode == 0, r.stderr
    return root


@pytest.fixture
def client(repo, random_gguf):
    accounts = Accounts(open_db())
    accounts.add_user("alice", ["payments"])
    accounts.add_user("mallory", ["web"])
    _, alice = accounts.create_token("alice-editor", user="alice")
    _, mallory = accounts.create_token("mallory-editor", user="mallory")
    engine = LlamaCppEngine.from_path(random_gguf, model_id="tiny", n_ctx=512, n_threads=1)
    holder = ModelHolder("tiny")
    holder.set(engine)
    app = create_app(load_settings(), holder=holder, accounts=accounts, retriever=Retriever())
    with TestClient(app) as c:
        c.tokens = {"alice": alice, "mallory": mallory}
        yield c


def complete(client, who, body):
    return client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {client.tokens[who]}"})


BODY = {
    "model": "tiny",
    "prompt": "from billing.money import cents_to_display\n\n\ndef total(cents):\n    return cents_to_display(",
    "suffix": ")\n",
    "max_tokens": 2,
    "temperature": 0,
    "codemoat": {"repo": "payments", "path": "report.py", "return_snippets": True},
}


def test_reader_gets_the_definition_from_another_file(client):
    r = complete(client, "alice", BODY)
    assert r.status_code == 200, r.text
    snippets = r.json()["codemoat"]["snippets"]
    assert any(s["path"] == "billing/money.py" and "def cents_to_display" in s["text"] for s in snippets)
    assert all(s["repo"] == "payments" for s in snippets)


def test_outsider_gets_no_snippet_and_no_error(client):
    r = complete(client, "mallory", BODY)
    assert r.status_code == 200
    assert r.json()["codemoat"]["snippets"] == []


def test_tabby_git_url_and_debug_snippets(client, repo):
    body = {
        "language": "python",
        "segments": {"prefix": BODY["prompt"], "suffix": ")\n", "filepath": str(repo / "report.py")},
        "debug_options": {"return_snippets": True},
    }
    r = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {client.tokens['alice']}"})
    assert r.status_code == 200, r.text
    assert any("cents_to_display" in s["body"] for s in r.json()["debug_data"]["snippets"])
    r = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {client.tokens['mallory']}"})
    assert r.json()["debug_data"]["snippets"] == []


def test_chat_grounded_in_a_named_repository(client):
    msgs = [{"role": "user", "content": "How is money shown to people in @payments?"}]
    r = client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": msgs, "max_tokens": 2, "codemoat": {"return_snippets": True}},
        headers={"Authorization": f"Bearer {client.tokens['alice']}"},
    )
    assert r.status_code == 200, r.text
    assert any(s["path"] == "billing/money.py" for s in r.json()["codemoat"]["snippets"])
    r = client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": msgs, "max_tokens": 2, "codemoat": {"repos": ["payments"]}},
        headers={"Authorization": f"Bearer {client.tokens['mallory']}"},
    )
    assert r.status_code == 403 and "not readable" in r.json()["error"]["message"]


def test_best_snippet_sits_next_to_the_code_being_completed(client, repo):
    body = {
        "language": "python",
        "segments": {"prefix": BODY["prompt"], "suffix": ")\n", "filepath": str(repo / "report.py")},
        "debug_options": {"return_snippets": True, "return_prompt": True},
    }
    r = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {client.tokens['alice']}"})
    assert r.status_code == 200, r.text
    debug = r.json()["debug_data"]
    ranked = [s["body"].strip() for s in debug["snippets"]]  # best first
    assert len(ranked) >= 2, ranked
    where = [debug["prompt"].index(body) for body in ranked]
    assert where == sorted(where, reverse=True)  # best last in the prompt
    assert where[0] < debug["prompt"].index("<|fim_prefix|>")


def test_as_many_tokens_as_fit_still_gets_retrieval(client):
    """Ollama's num_predict -1 (and llama.cpp's n_predict -1) asks for as many tokens as fit: the
    snippets keep their room, and the generation gets what the prompt leaves (it used to reserve
    the whole max_tokens limit, leaving no room for retrieval at all)."""
    body = {
        "model": "tiny",
        "prompt": BODY["prompt"],
        "suffix": BODY["suffix"],
        "stream": False,
        "options": {"num_predict": -1, "temperature": 0, "stop": ["\n"]},
        "codemoat": BODY["codemoat"],
    }
    r = client.post("/api/generate", json=body, headers={"Authorization": f"Bearer {client.tokens['alice']}"})
    assert r.status_code == 200, r.text
    assert any(s["path"] == "billing/money.py" for s in r.json()["codemoat"]["snippets"])
    r = client.post(
        "/infill",
        json={
            "input_prefix": BODY["prompt"],
            "input_suffix": BODY["suffix"],
            "n_predict": -1,
            "stop": ["\n"],
            "codemoat": BODY["codemoat"],
        },
        headers={"Authorization": f"Bearer {client.tokens['alice']}"},
    )
    assert r.status_code == 200, r.text
    assert any(s["path"] == "billing/money.py" for s in r.json()["codemoat"]["snippets"])
