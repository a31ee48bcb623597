"""What a request's audit record costs on its path, in the real app (a real llama.cpp engine on the
tiny model): the usage row commits with the record, a stream ends only once its record is written,
and a short prompt is built without a worker thread."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from codemoat.config import Settings
from codemoat.serve.prepare import IDLE_INLINE_CHARS, INLINE_CHARS
from codemoat.usage.tables import completions

from .test_audit_trust import _uvicorn
from .trustapp import GREEDY, make_app, records, tiny_llm

llm = tiny_llm  # the module's engine (trustapp)


def _usage_rows(engine) -> int:
    with engine.connect() as c:
        return int(c.execute(sa.select(sa.func.count()).select_from(completions)).scalar())


def test_the_usage_row_commits_with_the_audit_record(engine, accounts, tokens, llm):
    """One commit for the record, its usage row and its roll-ups (there were two transactions)."""
    commits = []
    sa.event.listen(engine, "commit", lambda conn: commits.append(1))
    with TestClient(make_app(Settings(), accounts, llm)) as c:
        body = {**GREEDY, "prompt": "def add(a, b):", "max_tokens": 4}
        assert c.post("/v1/completions", json=body, headers=tokens["alice"]).status_code == 200  # token's last_used, once
        commits.clear()
        assert c.post("/v1/completions", json=body, headers=tokens["alice"]).status_code == 200
        assert len(commits) == 1
    assert [r["status"] for r in records(engine)] == [200, 200]
    assert _usage_rows(engine) == 2


def test_a_failing_usage_write_never_costs_the_record(engine, accounts, tokens, llm, caplog):
    """The usage row shares the record's transaction; when it fails, the record is written without it."""
    app = make_app(Settings(), accounts, llm)
    usage = app.state.trust.usage

    def broken(*a, **kw):
        raise RuntimeError("usage table gone")

    usage.record = broken
    with caplog.at_level(logging.WARNING), TestClient(app) as c:
        r = c.post("/v1/completions", json={**GREEDY, "prompt": "x", "max_tokens": 3}, headers=tokens["alice"])
        assert r.status_code == 200
    recs = records(engine)
    assert [(x["user"], x["status"]) for x in recs] == [("alice", 200)]
    assert app.state.trust.log.verify().ok
    assert "usage table gone" in caplog.text and _usage_rows(engine) == 0


def test_a_stream_ends_only_once_its_record_is_written(engine, accounts, tokens, port, llm):
    """A client that reads a stream to its end finds its record written (a slow write holds the end,
    not the next request): the record used to be written after the stream had ended."""
    import httpx

    app = make_app(Settings(), accounts, llm)
    log = app.state.trust.log
    flush = log._flush  # every record's write, from a worker thread or the log's writer thread

    def slow_flush(batch):
        time.sleep(0.5)
        return flush(batch)

    log._flush = slow_flush
    server, t = _uvicorn(app, port)
    try:
        body = {**GREEDY, "prompt": "def add(a, b):", "max_tokens": 6, "stream": True}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=tokens["alice"]) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data:")]
            recs = records(engine)  # at once, as the client's next request would come
    finally:
        server.should_exit = True
        t.join(timeout=10)
    assert lines[-1] == "data: [DONE]" and len(lines) > 2
    assert [(x["user"], x["route"], x["status"]) for x in recs] == [("alice", "/v1/completions", 200)]
    assert recs[0]["completion_tokens"] == 6


def test_only_a_short_prompt_that_draws_on_no_index_is_built_on_the_event_loop(engine, accounts, llm):
    svc = make_app(Settings(), accounts, llm).state.service
    prep = svc._preparer
    assert prep.inline(svc.plain_prompt, (None, "x" * INLINE_CHARS, None))
    assert not prep.inline(svc.plain_prompt, (None, "x" * (INLINE_CHARS + 1), None))
    chat = [{"role": "user", "content": "y" * (INLINE_CHARS // 2)}]
    assert prep.inline(svc.chat_prompt, (None, None, chat, None))
    assert not prep.inline(svc.chat_prompt, (None, None, chat * 3, None))
    svc.retriever = object()  # an index to draw on: its queries are blocking I/O, on a worker thread
    assert not prep.inline(svc.chat_prompt, (None, None, chat, None))
    assert prep.inline(svc.plain_prompt, (None, "x", None))  # a raw prompt never draws on the index
    # on an idle server (no other request under way), up to IDLE_INLINE_CHARS: nobody's tokens wait on the loop
    assert prep.inline(svc.plain_prompt, (None, "x" * IDLE_INLINE_CHARS, None), True)
    assert not prep.inline(svc.plain_prompt, (None, "x" * (IDLE_INLINE_CHARS + 1), None), True)
    assert not prep.inline(svc.chat_prompt, (None, None, chat, None), True)  # an index query stays off the loop


@pytest.fixture
def placed(llm, monkeypatch) -> list[str]:
    """Where each of the engine's tokenisations ran: "loop" (the event loop's thread) or "worker"."""
    where: list[str] = []
    encode = llm.encode

    def tracked(*a, **kw):
        try:
            asyncio.get_running_loop()
            where.append("loop")
        except RuntimeError:
            where.append("worker")
        return encode(*a, **kw)

    monkeypatch.setattr(llm, "encode", tracked)
    return where


def _while_bob_generates(app, post):
    """`post()` while bob's request holds a place (generates meanwhile)."""
    svc = app.state.service
    svc._slots._take("bob")
    try:
        assert not svc.idle()
        return post()
    finally:
        svc._slots.release("bob")


def test_an_idle_server_builds_a_file_sized_prompt_in_place_and_a_busy_one_on_a_worker(engine, accounts, tokens, llm, placed):
    """An editor's file prefix (past INLINE_CHARS) is tokenised on the event loop while no other request
    is under way, without the hop to a worker thread and back; while another request holds a place it goes
    to a worker thread, so that request's tokens do not wait for it."""
    app = make_app(Settings(), accounts, llm)
    body = {**GREEDY, "prompt": "def " * (INLINE_CHARS // 2), "max_tokens": 2}  # 1,024 characters, ~260 tokens
    with TestClient(app) as c:
        assert app.state.service.idle()
        assert c.post("/v1/completions", json=body, headers=tokens["alice"]).status_code == 200
        idle, placed[:] = list(placed), []
        r = _while_bob_generates(app, lambda: c.post("/v1/completions", json=body, headers=tokens["alice"]))
        assert r.status_code == 200 and app.state.service.idle()
    assert idle and set(idle) == {"loop"}
    assert placed and set(placed) == {"worker"}


def test_many_small_extra_files_are_not_a_short_prompt(engine, accounts, tokens, llm, placed):
    """Each extra file costs two tokenisations (~24 us) beyond its characters: 511 one-character files held the
    loop ~12 ms while other requests generated (reviewer V4); the negative: a couple of short ones stay on the loop."""
    app = make_app(Settings(), accounts, llm)
    many = {"input_prefix": "x", "input_extra": [{"filename": "", "text": "y"}] * (INLINE_CHARS - 1), "n_predict": 1}
    few = {"input_prefix": "def f():\n", "input_extra": [{"filename": "a.py", "text": "x = 1\n"}] * 2, "n_predict": 1}
    with TestClient(app) as c:
        r = _while_bob_generates(app, lambda: c.post("/infill", json=many, headers=tokens["alice"]))
        assert r.status_code == 200
        assert len(placed) > INLINE_CHARS - 1 and set(placed) == {"worker"}, f"{placed.count('loop')} on the loop"
        placed.clear()
        r = _while_bob_generates(app, lambda: c.post("/infill", json=few, headers=tokens["alice"]))
        assert r.status_code == 200
        assert placed and set(placed) == {"loop"}


def test_concurrent_requests_are_audited_by_the_log_writer_and_a_caller_without_a_token_by_a_worker(
    engine, accounts, tokens, port, llm
):
    """A real server: concurrent streamed requests' records are written by the audit log's writer thread
    (`AuditLog.append_async`), each one record with its usage row; a request without a valid token, whose
    caller is looked up in the database, is still recorded from a worker thread."""
    import asyncio

    import httpx

    app = make_app(Settings(), accounts, llm)
    log = app.state.trust.log
    flush, by = log._flush, []

    def named_flush(batch):
        by.append((threading.current_thread().name, len(batch)))
        return flush(batch)

    log._flush = named_flush
    server, t = _uvicorn(app, port)

    async def clients() -> list[int]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=tokens["alice"], timeout=60) as c:

            async def one(i: int) -> int:
                body = {**GREEDY, "prompt": f"def f{i}(x):", "max_tokens": 4, "stream": True}
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    data = [x async for x in r.aiter_lines() if x.startswith("data:")]
                    return r.status_code if data[-1] == "data: [DONE]" else 0

            return await asyncio.gather(*(one(i) for i in range(6)))

    try:
        assert asyncio.run(clients()) == [200] * 6
        writers = sorted({name for name, _ in by})
        bad = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer cm_not_a_token"})
    finally:
        server.should_exit = True
        t.join(timeout=10)
    assert writers == ["audit-writer"]
    assert bad.status_code == 401
    assert [x["status"] for x in records(engine)] == [200] * 6 + [401]
    assert by[-1][0] != "audit-writer"
    assert _usage_rows(engine) == 6 and log.verify().ok
