"""The prompt's tokens found in the engine's cache are reported as the protocols do (OpenAI's
`usage.prompt_tokens_details.cached_tokens`, llama.cpp's `timings.cache_n` with `prompt_n` the tokens evaluated):
an editor's plugin and a gateway's cost tracking read them. The cache is per user, and so is what is reported:
bob never learns from these fields that alice just sent the same text."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from codemoat.accounts import Accounts
from codemoat.config import load_settings
from codemoat.db import open_db
from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.serve.app import create_app
from kept_holder import KeptHolder

FILE = "def total(items):\n    s = 0\n    for it in items:\n        s += it.price * it.qty\n    return s\n" * 6


@pytest.fixture(scope="module", params=[4, 1], ids=["batched", "one-at-a-time"])
def served(request, random_gguf):
    """An app over a real llama.cpp engine, and two users' headers."""
    e = LlamaCppEngine.from_path(random_gguf, model_id="tiny", n_ctx=1024, n_threads=1, parallel=request.param)
    accounts = Accounts(open_db())
    holder = KeptHolder(e.model_id)
    holder.set(e)
    app = create_app(load_settings(), holder=holder, accounts=accounts)
    users = {u: {"Authorization": f"Bearer {accounts.create_token(u)[1]}"} for u in ("alice", "bob")}
    with TestClient(app) as c:
        yield c, users
    e.close()


def _completion(c, who, prompt, stream=False):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
        with c.stream(
            "POST", "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": prompt}]}, headers=who
        ) as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        return events[-1]["usage"]
    r = c.post("/v1/completions", json=body, headers=who)
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def test_a_resent_prefix_is_reported_cached_for_its_own_user_only(served):
    c, users = served
    first = _completion(c, users["alice"], FILE)
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    again = _completion(c, users["alice"], FILE + "def refund(order):\n")  # the editor typed on
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < again["prompt_tokens"] and cached >= first["prompt_tokens"] // 2
    other = _completion(c, users["bob"], FILE + "def refund(order):\n")  # the same text from another user
    assert other["prompt_tokens"] == again["prompt_tokens"]
    assert other["prompt_tokens_details"]["cached_tokens"] == 0


def test_a_streamed_chats_usage_says_what_was_cached(served):
    c, users = served
    _completion(c, users["alice"], "explain:\n" + FILE, stream=True)
    u = _completion(c, users["alice"], "explain:\n" + FILE, stream=True)
    assert 0 < u["prompt_tokens_details"]["cached_tokens"] < u["prompt_tokens"]


def test_infill_timings_count_what_was_evaluated_and_what_was_cached(served):
    c, users = served
    body = {"input_prefix": FILE, "input_suffix": "\n", "n_predict": 4, "temperature": 0}
    for n in range(2):
        r = c.post("/infill", json={**body, "input_prefix": FILE + "x" * n}, headers=users["alice"])
        assert r.status_code == 200, r.text
        t = r.json()["timings"]
        assert t["cache_n"] + t["prompt_n"] == r.json()["tokens_evaluated"]
    assert t["cache_n"] > 0 and t["prompt_n"] < t["cache_n"]  # the second: most of the prompt was in the cache
