"""Hostile input at the trust layer (issue 14 items 5, 11 and 13): the secret screen reads only
authenticated bodies and in bounded time; a lone surrogate is a 400 on every route; nothing a
caller sends reaches the audit log verbatim."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from audit.trustapp import db_bytes, fresh_db, make_app, make_tokens, records, tiny_llm
from codemoat.accounts import Accounts
from codemoat.config import Settings

AWS = "AKIA" + "QWERTYUIOPASDFGH"


llm = tiny_llm  # the module's engine (trustapp)


db = fresh_db  # the test's own database engine (trustapp)


def client_for(db, llm, **settings) -> TestClient:
    accounts = Accounts(db)
    c = TestClient(make_app(Settings(**settings), accounts, llm))
    c.tokens = make_tokens(accounts)
    return c


@pytest.fixture
def scans(monkeypatch):
    """Every call of the secret screen's scanner (the real one runs), with how many characters it was given."""
    from codemoat.serve import screen

    seen: list[int] = []
    real = screen.scan_body

    def counted(body, limit=screen.SCAN_CHARS):
        seen.append(len(body))
        return real(body, limit)

    monkeypatch.setattr(screen, "scan_body", counted)
    return seen


def test_block_policy_authenticates_before_it_reads_a_body(db, llm):
    """The review's CPU drain: anyone could make the server scan 8 MiB bodies for secrets."""
    big = {"model": "tiny", "prompt": f"key = '{AWS}'\n" + "x = 1\n" * 200_000}
    with client_for(db, llm, policy={"secrets": "block"}) as c:
        for headers in ({}, {"Authorization": "Bearer cm_wrong"}, {"x-api-key": "cm_wrong"}):
            r = c.post("/v1/completions", json=big, headers=headers)
            assert r.status_code == 401, r.text[:200]  # not a 400 naming the secret: nobody read the body for it
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": f"key = '{AWS}'"}, headers=c.tokens["alice"])
        assert r.status_code == 400 and "aws_access_key_id" in r.text


def test_scanner_runs_only_for_a_valid_token(db, llm, scans):
    with client_for(db, llm, policy={"secrets": "block"}) as c:
        for headers in ({}, {"Authorization": "Bearer cm_wrong"}):
            assert c.post("/v1/events", json={"type": "view", "choice": AWS}, headers=headers).status_code == 401
        assert scans == []
        assert c.post("/v1/events", json={"type": "view", "choice": AWS}, headers=c.tokens["alice"]).status_code == 400
    assert len(scans) == 1


def test_tabby_and_openai_bodies_on_v1_completions_are_refused_each_in_its_own_shape(db, llm):
    """Was (an outside fuzzer): under policy.secrets = "block" a Tabby completion holding a secret was refused in
    OpenAI's shape (the screen runs before the route tells the two apart), and a Tabby body that did not parse
    (not UTF-8, nested too deeply) got OpenAI's 400 though its 401 got Tabby's. Tabby's agent reads
    {"error": "..."}. The negatives: OpenAI's bodies keep OpenAI's shape, a prompt that only mentions
    "segments" included."""
    tabby_secret = {"segments": {"prefix": f"key = '{AWS}'\n", "suffix": "\n"}}
    openai_secret = {"model": "tiny", "prompt": f'"segments" = "{AWS}"'}
    with client_for(db, llm, policy={"secrets": "block"}) as c:
        h = {**c.tokens["alice"], "Content-Type": "application/json"}
        for body, proto in ((tabby_secret, "tabby"), (openai_secret, "openai")):
            r = c.post("/v1/completions", json=body, headers=c.tokens["alice"])
            assert r.status_code == 400 and "aws_access_key_id" in r.text, r.text
            err = r.json()["error"]
            assert isinstance(err, str) if proto == "tabby" else err["type"] == "invalid_request_error", (proto, r.text)
    with client_for(db, llm) as c:
        h = {**c.tokens["alice"], "Content-Type": "application/json"}
        for raw, proto in (
            (b'{"model": "\xff\xfe", "segments": {"prefix": "x"}}', "tabby"),
            (b'{"segments": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "tabby"),
            (b'{"model": "\xff\xfe", "prompt": "x"}', "openai"),
            (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "openai"),
        ):
            r = c.post("/v1/completions", content=raw, headers=h)
            assert r.status_code == 400 and "not valid JSON" in r.text, r.text[:300]
            err = r.json()["error"]
            assert isinstance(err, str) if proto == "tabby" else err["type"] == "invalid_request_error", (proto, r.text)


def test_scan_is_bounded_and_looks_at_both_ends():
    from codemoat.serve import screen

    limit = 1000
    filler = "y = 2\n" * 10_000
    head, tail, middle = f"{AWS}\n" + filler, filler + f"\n{AWS}", filler + f"\n{AWS}\n" + filler
    assert screen.scan_body(json.dumps({"prompt": head}).encode(), limit)[0] == {"aws_access_key_id"}
    assert screen.scan_body(json.dumps({"prompt": tail}).encode(), limit)[0] == {"aws_access_key_id"}  # the cursor's end
    assert screen.scan_body(json.dumps({"prompt": middle}).encode(), limit)[0] == set()  # past the bound: not scanned
    scanned = list(screen._bounded(iter(["a" * 600, "b" * 600, "c" * 600]), limit))
    assert sum(map(len, scanned)) == limit and scanned[0] == "a" * 600
    assert screen.scan_body(b"not json " + AWS.encode(), limit)[0] == {"aws_access_key_id"}  # text, when not JSON


HOSTILE = json.dumps("def f():\n    return '\ud800'")  # JSON's "\ud800": a lone surrogate once decoded
ROUTES = [
    ("/v1/completions", '{"model": "tiny", "prompt": %s, "max_tokens": 2}', "openai"),
    ("/v1/completions", '{"model": "tiny", "prompt": "x", "suffix": %s, "max_tokens": 2}', "openai"),
    ("/v1/completions", '{"segments": {"prefix": %s, "suffix": "\\n"}}', "tabby"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": %s}], "max_tokens": 2}', "openai"),
    ("/api/generate", '{"model": "tiny", "prompt": %s, "stream": false}', "ollama"),
    ("/api/generate", '{"model": "tiny", "prompt": "x", "suffix": %s, "raw": true, "stream": false}', "ollama"),
    ("/api/chat", '{"model": "tiny", "messages": [{"role": "user", "content": %s}], "stream": false}', "ollama"),
    ("/infill", '{"input_prefix": %s, "input_suffix": "", "n_predict": 2}', "infill"),
    ("/infill", '{"input_prefix": "x", "input_extra": [{"filename": "a.py", "text": %s}], "n_predict": 2}', "infill"),
    ("/v1/events", '{"type": "view", "choice": %s}', "tabby"),
    ("/api/show", '{"model": %s}', "ollama"),
]


@pytest.mark.parametrize("path,template,proto", ROUTES)
def test_lone_surrogate_is_a_400_in_the_protocols_shape(db, llm, path, template, proto):
    with client_for(db, llm) as c:
        for body in (template % HOSTILE, (template % '"x"').replace('"x"', '"\\udfff"', 1)):
            r = c.post(path, content=body.encode(), headers={**c.tokens["alice"], "Content-Type": "application/json"})
            assert r.status_code == 400, (path, body, r.text)
            assert "surrogate" in r.text and "Traceback" not in r.text
            err = r.json()["error"]
            if proto in ("openai", "infill"):
                assert err["type"] == "invalid_request_error" and "surrogate" in err["message"]
            else:  # Ollama's and Tabby's {"error": "..."}
                assert isinstance(err, str)
        raw = '{"model": "tiny", "prompt": "x\xed\xa0\x80"}'.encode("latin-1")  # the surrogate's UTF-8-like bytes
        assert (
            c.post("/v1/completions", content=raw, headers={**c.tokens["alice"], "Content-Type": "application/json"}).status_code
            == 400
        )
        assert c.post(path, json={"model": "tiny"} if proto == "ollama" else {}, headers=c.tokens["alice"]).status_code != 500


def test_event_type_and_unmatched_paths_never_stored_verbatim(db, llm):
    import codemoat.paths as paths

    with client_for(db, llm) as c:
        r = c.post("/v1/events", json={"type": AWS, "completion_id": "x"}, headers=c.tokens["alice"])
        assert r.status_code == 200
        assert c.post("/v1/events", json={"type": "select"}, headers=c.tokens["alice"]).status_code == 200
        assert c.get(f"/v1/{AWS}/keys", headers=c.tokens["alice"]).status_code == 404
        assert c.request(AWS, "/v1/completions", headers=c.tokens["alice"]).status_code in (400, 405)
        assert AWS not in json.dumps(c.app.state.events) and c.app.state.events == {"other": 1, "select": 1}
    recs = records(db)
    assert [(r["route"], r["detail"].get("event")) for r in recs[:2]] == [("/v1/events", "other"), ("/v1/events", "select")]
    # no route authenticated these two, but the token is valid: each is alice's own record, nothing verbatim
    assert [(r["route"], r["status"], r["user"], r["detail"]["method"]) for r in recs[2:]] == [
        ("unmatched", 404, "alice", "GET"),
        ("/v1/completions", 405, "alice", "other"),
    ]
    assert AWS.encode() not in db_bytes(paths.home())


@pytest.fixture
def parses(monkeypatch):
    """Every body that serve.body parsed (the real check runs), by its length in bytes."""
    from codemoat.serve import body

    seen: list[int] = []
    real = body.json.loads

    class Counted:
        JSONDecodeError = body.json.JSONDecodeError

        @staticmethod
        def loads(raw, *a, **kw):
            seen.append(len(raw))
            return real(raw, *a, **kw)

    monkeypatch.setattr(body, "json", Counted)
    return seen


def test_completions_authenticate_before_they_parse_a_body(db, llm, parses):
    """Was broken: /v1/completions parsed the JSON body (to tell Tabby's requests from OpenAI's) before it
    checked the token, so anyone could make the server parse and walk 8 MiB bodies of millions of tiny
    values on its event loop (about a second each on this machine, every other request waiting)."""
    junk = b'{"model": "tiny", "prompt": "x", "junk": [' + b"[]," * 50_000 + b"[]]}"
    with client_for(db, llm) as c:
        for headers in ({}, {"Authorization": "Bearer cm_wrong"}):
            r = c.post("/v1/completions", content=junk, headers={**headers, "Content-Type": "application/json"})
            assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error", r.text[:200]
            tabby = b'{"segments": {"prefix": "def f("}, "junk": [' + b"[]," * 50_000 + b"[]]}"
            r = c.post("/v1/completions", content=tabby, headers={**headers, "Content-Type": "application/json"})
            assert r.status_code == 401 and isinstance(r.json()["error"], str), r.text[:200]  # Tabby's shape, unparsed
        assert parses == []
        r = c.post("/v1/completions", content=junk, headers={**c.tokens["alice"], "Content-Type": "application/json"})
        assert r.status_code == 200 and parses == [len(junk)]


def test_a_body_of_millions_of_tiny_values_is_refused(db, llm):
    """Was broken: a token holder's 4 MiB /infill body of a million empty `input_extra` entries took about
    3 s of CPU to parse, walk and validate, all on the event loop, every other request waiting (a million
    empty chat content parts, or Ollama messages, likewise). A body holding more JSON values than any
    client sends is a 400 in its protocol's shape before it is validated; a long real conversation is not."""
    many = 1_000_000
    cases = [
        ("/infill", {"input_prefix": "x", "n_predict": 1, "input_extra": [{}] * many}),
        ("/v1/chat/completions", {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": [{}] * many}]}),
        ("/api/chat", {"model": "tiny", "stream": False, "messages": [{}] * many}),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1, "junk": [[]] * many}),
        ("/v1/completions", {"segments": {"prefix": "x", "declarations": [{}] * many}}),
    ]
    with client_for(db, llm) as c:
        for path, body in cases:
            r = c.post(path, content=json.dumps(body), headers={**c.tokens["alice"], "Content-Type": "application/json"})
            assert r.status_code == 400 and ("JSON values" in r.text or "JSON objects" in r.text), (
                path,
                r.status_code,
                r.text[:200],
            )
        chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(2001)]
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 1, "messages": chat}, headers=c.tokens["alice"])
        assert r.status_code != 400 or "JSON values" not in r.text, r.text[:200]


def test_a_body_of_many_small_objects_is_refused_before_it_is_validated(db, llm):
    """Was open: under the 100,000-value cap, a token holder's body of 99,999 empty objects (an /infill
    `input_extra`, chat content parts, Ollama messages, Tabby declarations) became as many validated
    models: about 0.23-0.3 s of one CPU holding the interpreter lock (pydantic's validation does not let
    go of it, on a worker thread either), every other client's stream waiting. Each object becomes a
    model; a body of more objects than any client sends is a 400 in its protocol's shape; a
    2,000-message chat is not."""
    many = 10_001  # serve.body.MAX_OBJECTS + 1; values: twice that at most, far under the 100,000-value cap
    cases = [
        ("/infill", {"input_prefix": "x", "n_predict": 1, "input_extra": [{}] * many}),
        ("/v1/chat/completions", {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": [{}] * many}]}),
        ("/api/chat", {"model": "tiny", "stream": False, "messages": [{"role": "user", "content": "x"}] * many}),
        ("/v1/completions", {"segments": {"prefix": "x", "declarations": [{}] * many}}),
    ]
    with client_for(db, llm) as c:
        for path, body in cases:
            r = c.post(path, content=json.dumps(body), headers={**c.tokens["alice"], "Content-Type": "application/json"})
            assert r.status_code == 400 and "JSON objects" in r.text, (path, r.status_code, r.text[:200])
        chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(2001)]
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 1, "messages": chat}, headers=c.tokens["alice"])
        assert r.status_code != 400 or "JSON" not in r.text, r.text[:200]


def assert_stream_moves_on(db, llm, free_port, monkeypatch, held, is_bobs, route, bobs, what) -> None:
    """Real uvicorn: alice streams a paced chat while bob posts `bobs` (httpx keywords) to `route`; the
    first call of `held` (an (object, name) pair) whose first argument `is_bobs` picks out as bob's is
    held in flight (the real call runs after) until alice's stream has sent three more chunks, or for
    20 s, the old code's fate. Bob's request is served too. `is_bobs` gets the call's arguments."""
    import threading
    import time

    import httpx
    import uvicorn

    from audit.trustapp import Paced

    started, moved, done = threading.Event(), threading.Event(), threading.Event()
    target, name = held
    real = getattr(target, name)

    def hold(first, *a, **kw):
        if is_bobs(first, *a, **kw) and not started.is_set():
            started.set()
            moved.wait(20)
            done.set()
        return real(first, *a, **kw)

    monkeypatch.setattr(target, name, hold)
    accounts = Accounts(db)
    tokens = make_tokens(accounts)
    app = make_app(Settings(), accounts, Paced(llm, 0.05))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started and t.is_alive():
        time.sleep(0.05)
    base = f"http://127.0.0.1:{free_port}"
    answers: list[int] = []

    def post_bobs() -> None:
        with httpx.Client(base_url=base, headers=tokens["bob"], timeout=60) as c:
            answers.append(c.post(route, **bobs).status_code)

    during = 0
    try:
        chat = {
            "model": "tiny",
            "temperature": 0,
            "max_tokens": 400,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
        with httpx.Client(base_url=base, headers=tokens["alice"], timeout=60) as c:
            with c.stream("POST", "/v1/chat/completions", json=chat) as r:
                lines = (line for line in r.iter_lines() if line.startswith("data:"))
                assert '"role"' in next(lines) and '"content"' in next(lines)
                poster = threading.Thread(target=post_bobs, daemon=True)
                poster.start()
                assert started.wait(20), f"bob's call to {name} was never made"
                for line in lines:
                    if done.is_set() or line == "data: [DONE]":
                        break
                    during += 1
                    if during == 3:
                        moved.set()
        moved.set()
        poster.join(30)
    finally:
        server.should_exit = True
        t.join(timeout=10)
    assert during >= 3, f"alice's stream sent {during} chunks while bob's {what}"
    assert answers == [200], answers  # bob's request was served too


def test_a_stream_moves_on_while_another_clients_large_body_is_parsed(db, llm, free_port, monkeypatch):
    """Was open: every body was parsed and walked on the event loop, so while one token holder's large
    body (up to 100,000 values) was parsed, no other client's stream moved. A large body is now
    parsed and walked on a worker thread. Real uvicorn; alice streams a paced chat while bob posts a
    large body whose walk is held in flight (the real walk runs after) until alice's stream has sent
    three more chunks: before, the stream sent nothing while the walk was held (20 s, then failed)."""
    from codemoat.serve import body

    junk = b'{"model": "tiny", "prompt": "x", "max_tokens": 1, "junk": [' + b"[]," * 50_000 + b"[]]}"
    assert_stream_moves_on(
        db,
        llm,
        free_port,
        monkeypatch,
        (body, "lone_surrogate"),
        lambda doc, *_, **__: isinstance(doc, dict) and "junk" in doc,
        "/v1/completions",
        {"content": junk, "headers": {"Content-Type": "application/json"}},
        "body was parsed",
    )


_LONG_NAME = "bobs-file/" + "a" * 100_000
_EMPTY_TURNS = 3_000
#: bob's request whose prompt is long though its text is short -> the call that tokenises it (held in
#: flight), and what tells bob's call apart. A chat's turns are tokenised one distinct part at a time
#: (serve.prompts._Tokens), so there the call held is the chat's prompt builder itself.
_SHORT_TEXT_LONG_PROMPT = {
    "file-name": (
        "/infill",
        {"input_prefix": "x", "input_extra": [{"filename": _LONG_NAME, "text": "y"}], "n_predict": 1},
        "encode",
        lambda parts, *_, **__: any(_LONG_NAME in getattr(p, "text", "") for p in parts),
    ),
    "empty-turns": (
        "/v1/chat/completions",
        {
            "model": "tiny",
            "max_tokens": 1,
            "messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": ""} for i in range(_EMPTY_TURNS)]
            + [{"role": "user", "content": "hi"}],
        },
        "build_chat",
        lambda engine, chat, messages, *_, **__: len(messages) > _EMPTY_TURNS,
    ),
}


@pytest.mark.parametrize("case", list(_SHORT_TEXT_LONG_PROMPT))
def test_a_stream_moves_on_while_another_clients_short_text_long_prompt_is_tokenised(db, llm, free_port, monkeypatch, case):
    """Was open (68516f1): a prompt of at most 512 characters is built on the event loop, and the count
    took only the text a client sent: a FIM request's prefix, suffix and extra files' text, a chat's
    contents. The prompt also holds the file names (`# name` before each extra file) and each turn's
    template markers. A token holder's /infill of one extra file with a one-character text and a
    100,000-character name, or a chat of 3,000 empty turns (rendered and tokenised again for each step
    of the bisection that drops turns), was tokenised on the event loop, every other client's stream
    held meanwhile. Now the names and a share per turn count. Real uvicorn: alice streams a paced chat
    while bob's prompt is tokenised, held in flight until alice's stream sends three more chunks."""
    from codemoat.serve import prompts

    route, bobs, call, is_bobs = _SHORT_TEXT_LONG_PROMPT[case]
    held = (llm, "encode") if call == "encode" else (prompts, call)
    assert_stream_moves_on(db, llm, free_port, monkeypatch, held, is_bobs, route, {"json": bobs}, "prompt was tokenised")
