"""`server.max_queue_wait_s`: a request that waits longer than that for a place of the server or a slot
of the engine is refused with its protocol's overloaded error (503 with Retry-After; Ollama's and
Tabby's `{"error": ...}`, llama.cpp's `unavailable_error`) instead of waiting as long as it takes, and
it never takes a slot (no prompt is evaluated for it). Before, there was no such limit: every request
below waited until the ones ahead of it ended."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import httpx
import pytest

from codemoat.engines.base import SamplingParams
from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.engines.supervised import SupervisedEngine
from codemoat.errors import Overloaded
from enginehelp import batched_engine, greedy, run, served

engine = batched_engine  # the module's fixture: one batched engine of 2 slots


def test_a_request_still_waiting_for_a_slot_at_its_deadline_is_refused_and_takes_none(engine):
    """Two answers that never end early hold both slots; a third request may wait 0.3 s: it gets
    `Overloaded` while they still run, and its prompt is never evaluated; the holders are not disturbed."""
    lib, vocab = engine._lib, engine._vocab
    eog = [t for t in range(engine.n_vocab) if lib.llama_vocab_is_eog(vocab, t)]

    def no_end(ids, logits):
        # at least 2 ms a token, so 400 tokens outlast the 0.3 s wait on any machine (the tiny model makes
        # ~1,500 tokens/s on a quiet one: the holders ended first and the test failed now and then)
        time.sleep(0.002)
        logits[eog] = -math.inf
        return logits

    b, started = engine._batcher, []
    start = b._start
    b._start = lambda seq, free: started.append(seq.ids) or start(seq, free)
    try:

        async def go():
            hold = SamplingParams(max_tokens=400, temperature=0.8, seed=1, logits_processors=[no_end])
            holders = [engine.stream(p, hold) for p in ("def add(a, b):", "class Queue:")]
            for h in holders:
                await h.__anext__()
            t0 = time.monotonic()
            with pytest.raises(Overloaded, match="server.max_queue_wait_s"):
                await engine.complete("import this\n", greedy(queue_deadline=time.monotonic() + 0.3))
            waited = time.monotonic() - t0
            busy = engine.health()["slots"]
            n = 0
            for h in holders:
                async for c in h:
                    n += len(c.token_ids)
            return waited, busy, n

        waited, busy, n = run(go())
    finally:
        b._start = start
    assert waited >= 0.3
    assert busy == {"total": 2, "busy": 2, "waiting": 0}  # refused while both still ran
    assert n > 0
    assert engine.tokenize("import this\n") not in started
    assert run(engine.complete("import this\n", greedy())).completion_tokens >= 1  # no deadline: served


def test_the_one_at_a_time_engine_refuses_a_request_that_waited_past_its_deadline(tiny_gguf):
    eng = LlamaCppEngine.from_path(tiny_gguf, n_ctx=256, n_threads=1, parallel=1)
    try:
        gate = threading.Event()
        eng._submit(gate.wait)  # the worker is busy with the request ahead

        async def go():
            late = asyncio.ensure_future(eng.complete("x = 1\n", greedy(queue_deadline=time.monotonic() + 0.2)))
            await asyncio.sleep(0.4)
            gate.set()
            with pytest.raises(Overloaded):
                await late
            return await eng.complete("x = 1\n", greedy(queue_deadline=time.monotonic() + 60))

        assert run(go()).completion_tokens >= 1
    finally:
        eng.close()


def test_overloaded_crosses_from_the_engine_process_as_itself(tiny_gguf):
    """Through the engine's child process, the refusal is still `Overloaded` (the server answers 503 with
    Retry-After), not a generic error that the server would answer as a 400."""
    eng = SupervisedEngine.start(LlamaCppEngine, tiny_gguf, {"n_ctx": 256, "n_threads": 1, "parallel": 2})
    try:

        async def go():
            with pytest.raises(Overloaded, match="server.max_queue_wait_s"):
                await eng.complete("x = 1\n", greedy(queue_deadline=time.monotonic() - 1))
            return await eng.complete("x = 1\n", greedy())

        assert run(go()).completion_tokens >= 1
    finally:
        eng.close()


# each protocol's request, and what its client reads from an overloaded server
CASES = {
    "openai": ("/v1/completions", {"model": "tiny", "prompt": "def f(x):\n", "max_tokens": 4}),
    "openai-chat": ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    "ollama": ("/api/generate", {"model": "tiny", "prompt": "def f(x):\n", "stream": False, "options": {"num_predict": 4}}),
    "ollama-chat": ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False}),
    "infill": ("/infill", {"input_prefix": "def f(x):\n", "input_suffix": "\n", "n_predict": 4}),
    "tabby": ("/v1/completions", {"language": "python", "segments": {"prefix": "def f(x):\n", "suffix": "\n"}}),
}
# the same, streamed (Tabby's completions have no stream; its chat is OpenAI's): the headers wait for the
# first token, so a refusal before it is a real 503 too (it was an in-band error inside a 200 stream)
CASES |= {f"{name}-stream": (path, {**body, "stream": True}) for name, (path, body) in CASES.items() if name != "tabby"}


def test_each_protocol_gets_its_own_overloaded_error_after_the_wait_limit(engine):
    """The one place of `server.max_concurrent` is held; with `server.max_queue_wait_s = 0.2` every
    protocol's request, streamed or not, is answered after ~0.2 s with 503, Retry-After, and the body its
    client parses."""

    app, tokens = served(engine, **{"server.max_concurrent": 1, "server.max_queue_wait_s": 0.2})
    token = tokens["payments"]
    svc = app.state.service

    async def go():
        gate = asyncio.Event()

        async def hold():
            async with svc._slot("someone"):
                await gate.wait()

        holding = asyncio.ensure_future(hold())
        await asyncio.sleep(0)
        got = {}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            for name, (path, body) in CASES.items():
                t0 = time.monotonic()
                r = await c.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
                got[name] = (r, time.monotonic() - t0)
            gate.set()
            await holding
            after = await c.post("/v1/completions", json=CASES["openai"][1], headers={"Authorization": f"Bearer {token}"})
            streamed = await c.post(
                "/v1/completions", json=CASES["openai-stream"][1], headers={"Authorization": f"Bearer {token}"}
            )
        return got, after, streamed

    got, after, streamed = run(go())
    for name, (r, waited) in got.items():
        assert r.status_code == 503, (name, r.text)
        assert r.headers["Retry-After"] == "1", name
        assert waited >= 0.2, name
        assert r.headers["content-type"] == "application/json", name  # an error answer, not a 200 stream
        err = r.json()["error"]
        if name.startswith("openai"):
            assert err["type"] == "server_error" and err["code"] == "server_overloaded", err
            assert "busy" in err["message"]
        elif name.startswith("infill"):  # llama.cpp's server: {"error": {"code", "message", "type"}}
            assert err["code"] == 503 and err["type"] == "unavailable_error" and "busy" in err["message"], err
        else:  # Ollama and Tabby: {"error": "..."}
            assert isinstance(err, str) and "busy" in err, (name, err)
    assert after.status_code == 200, after.text  # the place is free again: nothing leaked
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.endswith("data: [DONE]\n\n") and '"text"' in streamed.text, streamed.text
    assert svc._slots.busy == 0 and svc._slots.waiting == 0


def test_a_streamed_request_whose_client_hangs_up_while_it_waits_gives_its_place_in_line_back(engine, free_port):
    """Attacker's test for the streamed routes' wait for the first token (`Service.open_stream`): the
    response has not begun, so the server itself must notice the hang-up. Over real TCP (uvicorn), one
    place held and no wait limit, a streamed client that gives up while queued leaves the line at once,
    and never takes the place once it is free; waiting for the first token without watching the
    connection would have kept it queued, then generated for nobody."""
    import uvicorn

    app, tokens = served(engine, **{"server.max_concurrent": 1})
    token = tokens["payments"]
    svc = app.state.service
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port, log_level="warning"))
    url, h = f"http://127.0.0.1:{free_port}", {"Authorization": f"Bearer {token}"}

    async def settle(cond) -> bool:
        for _ in range(1200):  # up to 30 s (a loaded CI is slow)
            if cond():
                return True
            await asyncio.sleep(0.025)
        return cond()

    async def go():
        serving = asyncio.ensure_future(server.serve())
        assert await settle(lambda: server.started)
        gate = asyncio.Event()

        async def hold():
            async with svc._slot("someone"):
                await gate.wait()

        holding = asyncio.ensure_future(hold())
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:

            async def give_up():
                async with c.stream("POST", "/v1/completions", json=CASES["openai-stream"][1], headers=h) as r:
                    return r.status_code

            asked = asyncio.ensure_future(give_up())
            queued = await settle(lambda: svc._slots.waiting == 1)
            asked.cancel()  # the editor moves on: its connection closes
            with pytest.raises(asyncio.CancelledError):
                await asked
            left = await settle(lambda: svc._slots.waiting == 0 and svc.waiting == 0)
            gate.set()
            await holding
            busy_after = svc._slots.busy
            r = await c.post("/v1/completions", json=CASES["openai"][1], headers=h)
        server.should_exit = True
        await serving
        return queued, left, busy_after, r

    queued, left, busy_after, r = run(go())
    assert queued, "the streamed request never queued for the held place"
    assert left, "the hung-up streamed request stayed in line"
    assert busy_after == 0  # it did not take the place once it was free
    assert r.status_code == 200, r.text
