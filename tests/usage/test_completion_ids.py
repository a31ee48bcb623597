"""Completion ids on every completion route (OpenAI, Ollama, llama.cpp /infill): each answer carries
`X-Codemoat-Completion-Id` (OpenAI's body `id` is the same), the editor sends it back to
`POST /v1/events`, and acceptance is counted under the completion's language and protocol. The
attacker's side: another user's id, a made-up id, a chat's id and a replayed select count nothing."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.db import open_db
from codemoat.serve.app import create_app
from codemoat.usage import report
from kept_holder import KeptHolder

HEADER = "X-Codemoat-Completion-Id"
CID = re.compile(r"^cmpl-[0-9a-f]{24}$")


@pytest.fixture
def app(home, tiny_llm):
    engine = open_db(f"sqlite:///{home / 'codemoat.db'}")
    accounts = Accounts(engine)
    holder = KeptHolder("tiny")
    holder.set(tiny_llm)
    _, ann = accounts.create_token("ann", user="ann", scopes=("complete", "chat"))
    _, eve = accounts.create_token("eve", user="eve", scopes=("complete",))
    with TestClient(create_app(Settings(), holder=holder, accounts=accounts)) as c:
        yield c, engine, {"Authorization": f"Bearer {ann}"}, {"Authorization": f"Bearer {eve}"}


def _event(c, who, type_: str, cid: str) -> None:
    assert c.post("/v1/events", json={"type": type_, "completion_id": cid, "choice_index": 0}, headers=who).status_code == 200


def test_every_completion_route_gives_an_id_that_events_can_name(app):
    c, engine, ann, eve = app
    r = c.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": "def f(", "suffix": "):\n", "max_tokens": 3, "codemoat": {"path": "a.go"}},
        headers=ann,
    )
    assert r.status_code == 200, r.text
    openai_id = r.headers[HEADER]
    assert CID.match(openai_id) and r.json()["id"] == openai_id
    r = c.post(
        "/api/generate",
        json={"model": "tiny", "prompt": "def f(", "suffix": "):\n", "stream": False, "options": {"num_predict": 3}},
        headers=ann,
    )
    assert r.status_code == 200, r.text
    ollama_id = r.headers[HEADER]
    r = c.post("/infill", json={"input_prefix": "def f(", "input_suffix": "):\n", "n_predict": 3}, headers=ann)
    assert r.status_code == 200, r.text
    infill_id = r.headers[HEADER]
    with c.stream(
        "POST", "/v1/completions", json={"model": "tiny", "prompt": "x = ", "max_tokens": 2, "stream": True}, headers=ann
    ) as s:
        streamed_id = s.headers[HEADER]
        assert streamed_id in s.read().decode()  # each chunk's id is the header's
    r = c.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers=ann,
    )
    chat_id = r.json()["id"]
    assert r.status_code == 200 and HEADER not in r.headers
    assert len({openai_id, ollama_id, infill_id, streamed_id}) == 4

    for cid in (openai_id, ollama_id, infill_id):
        _event(c, ann, "view", cid)
    _event(c, ann, "select", ollama_id)
    _event(c, ann, "select", ollama_id)  # replayed: counted once
    _event(c, eve, "select", openai_id)  # not eve's completion
    _event(c, ann, "select", "cmpl-" + "f" * 24)  # never handed out
    _event(c, ann, "select", chat_id)  # a chat is not a completion an editor accepts

    rep = report(engine, by="protocol")
    rows = {r.key: r for r in rep.rows}
    assert (rows["openai"].views, rows["openai"].selects) == (1, 0)
    assert (rows["ollama"].views, rows["ollama"].selects, rows["ollama"].acceptance) == (1, 1, 1.0)
    assert (rows["infill"].views, rows["infill"].selects) == (1, 0)
    assert "tabby" not in rows  # the events are counted under the completions' protocols
    assert (rep.total.views, rep.total.selects, rep.unmatched_events) == (3, 1, 3)
    assert {r.key: r.completions for r in report(engine, by="language").rows}.get("go") == 1  # codemoat.path a.go
