"""Under `policy.secrets = "redact"` a short prompt is screened while the engine starts on it
(`prepare.Preparer.screen`), and its record still names the secrets' kinds; under "block" the screen
comes before the engine. The real app over a real llama.cpp engine."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from audit.trustapp import GREEDY, fresh_db, make_app, make_tokens, records, tiny_llm
from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.serve import prompts

llm = tiny_llm  # the module's engine (trustapp)
db = fresh_db  # the test's own database engine (trustapp)

KEY = "AKIA" + "QWERTYUIOPASDFGH"
PROMPT = f"import boto3\nclient = boto3.client('s3', aws_access_key_id='{KEY}')\n"


@pytest.fixture
def order(monkeypatch, llm):
    """What happened first for each request: the screen, or the engine starting on the prompt."""
    seen: list[str] = []
    screen, stream = prompts.screen_text, llm.stream

    def screened(*a, **kw):
        seen.append("screen")
        return screen(*a, **kw)

    def streamed(*a, **kw):
        seen.append("engine")
        return stream(*a, **kw)

    monkeypatch.setattr(prompts, "screen_text", screened)
    monkeypatch.setattr(llm, "stream", streamed, raising=False)
    return seen


def test_a_short_prompt_is_screened_once_the_engine_has_it_and_its_record_names_the_secret(db, llm, order):
    accounts = Accounts(db)
    tokens = make_tokens(accounts)
    alice = tokens["alice"]
    with TestClient(make_app(Settings(), accounts, llm)) as c:
        assert c.post("/v1/completions", json={**GREEDY, "prompt": PROMPT, "max_tokens": 3}, headers=alice).status_code == 200
        with c.stream(
            "POST", "/v1/completions", json={**GREEDY, "prompt": PROMPT, "max_tokens": 3, "stream": True}, headers=alice
        ) as r:
            assert r.status_code == 200 and list(r.iter_lines())[-2] == "data: [DONE]"
        chat = {**GREEDY, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3}
        assert c.post("/v1/chat/completions", json=chat, headers=alice).status_code == 200
        # refused after the prompt was built (no room for 600 tokens in a 512-token context): never reached the engine
        r = c.post("/v1/completions", json={**GREEDY, "prompt": PROMPT, "max_tokens": 600}, headers=alice)
        assert r.status_code == 400
    assert order == ["engine", "screen"] * 3 + ["screen"]
    recs = records(db)
    assert [(x["status"], x["detail"].get("secrets")) for x in recs] == [
        (200, ["aws_access_key_id"]),
        (200, ["aws_access_key_id"]),
        (200, ["aws_access_key_id"]),
        (400, ["aws_access_key_id"]),
    ]


def test_under_block_the_screen_comes_before_the_engine(db, llm, order):
    accounts = Accounts(db)
    tokens = make_tokens(accounts)
    with TestClient(make_app(Settings(policy={"secrets": "block"}), accounts, llm)) as c:
        r = c.post("/v1/completions", json={**GREEDY, "prompt": "x = 1", "max_tokens": 2}, headers=tokens["alice"])
        assert r.status_code == 200
    assert order == ["screen", "engine"]
