"""A request for an idle engine tells it so before its prompt is built (`Engine.warm`): an engine process's
idle batch loop then polls without sleeping for a moment (`engines.child.WARM_S`), so the request does not
wait for its vCPU to wake. Only a caller that passed authentication and validation can cause it, and only
while nothing else is under way (the loop is awake then). On the real app, a real uvicorn and a real
llama.cpp engine, which the wrapper below only counts."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn

from audit.trustapp import GREEDY, Paced, fresh_db, make_app, make_tokens, tiny_llm
from codemoat.accounts import Accounts
from codemoat.config import Settings

llm = tiny_llm
db = fresh_db


class Counted(Paced):
    """The real engine (its chunks `pause` s apart), counting the times it was warned."""

    def __init__(self, engine, pause: float = 0.0):
        super().__init__(engine, pause)
        self.warned = 0

    def warm(self) -> None:
        self.warned += 1


@pytest.fixture
def served(db, llm, free_port):
    """(base URL, tokens, the counting engine) of a real server."""
    accounts = Accounts(db)
    tokens = make_tokens(accounts)
    eng = Counted(llm, 0.05)
    server = uvicorn.Server(
        uvicorn.Config(make_app(Settings(), accounts, eng), host="127.0.0.1", port=free_port, log_level="warning")
    )
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started and t.is_alive():
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{free_port}", tokens, eng
    finally:
        server.should_exit = True
        t.join(timeout=10)


COMP = {**GREEDY, "prompt": "def add(a, b):", "max_tokens": 2}


def test_each_generation_route_warns_an_idle_engine_once_per_request(served):
    base, tokens, eng = served
    options = {"num_predict": 2, "temperature": 0}
    with httpx.Client(base_url=base, headers=tokens["alice"], timeout=60) as c:
        for path, body in (
            ("/v1/completions", COMP),
            ("/v1/completions", {**COMP, "stream": True}),
            ("/v1/chat/completions", {**GREEDY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
            ("/api/generate", {"model": "tiny", "prompt": "def add(a, b):", "options": options, "stream": False}),
            ("/infill", {"input_prefix": "def add(a, b):\n", "input_suffix": "\n", "n_predict": 2, "temperature": 0}),
        ):
            before = eng.warned
            r = c.post(path, json=body)
            assert r.status_code == 200, (path, r.text)
            assert eng.warned == before + 1, path


def test_a_caller_refused_before_its_prompt_never_warns_the_engine(served):
    """A stranger (no token, a wrong one), a caller without the scope, a body that does not parse or names
    another model: none of them reaches the prompt, so none can keep the engine's core busy."""
    base, tokens, eng = served
    with httpx.Client(base_url=base, timeout=60) as c:
        refused = [
            c.post("/v1/completions", json=COMP).status_code,
            c.post("/v1/completions", json=COMP, headers={"Authorization": "Bearer cm_wrong"}).status_code,
            c.post("/v1/completions", json=COMP, headers=tokens["scraper"]).status_code,
            c.post(
                "/v1/completions", content=b"{not json", headers={**tokens["alice"], "content-type": "application/json"}
            ).status_code,
            c.post("/v1/completions", json={**COMP, "model": "other"}, headers=tokens["alice"]).status_code,
            c.post("/v1/completions", json={**COMP, "temperature": "hot"}, headers=tokens["alice"]).status_code,
        ]
    assert refused == [401, 401, 403, 400, 404, 400]
    assert eng.warned == 0


def test_a_request_while_another_generates_does_not_warn_the_engine(served):
    """The engine's loop is awake while it generates: a second request then sends nothing before its own."""
    base, tokens, eng = served
    long = {**COMP, "max_tokens": 40, "stream": True}
    with (
        httpx.Client(base_url=base, headers=tokens["alice"], timeout=60) as c,
        httpx.Client(base_url=base, headers=tokens["bob"], timeout=60) as other,
    ):
        with c.stream("POST", "/v1/completions", json=long) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: {"))
            next(lines)  # alice's stream is under way (its chunks come 50 ms apart)
            assert eng.warned == 1
            assert other.post("/v1/completions", json=COMP).status_code == 200
            assert eng.warned == 1, "a request beside a generating one warned the engine"
            for _ in lines:
                pass
    with httpx.Client(base_url=base, headers=tokens["bob"], timeout=60) as c:
        assert c.post("/v1/completions", json=COMP).status_code == 200
    assert eng.warned == 2  # idle again: the next request warns it
