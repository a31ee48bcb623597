"""Attacks on the batched llama.cpp engine (`engines/batch.py`) and the requests it serves side by side:
one user learning from another's cached prompt, one user holding every slot, a request the context cannot
take ending the engine's loop for everyone, hostile bodies that must get an answer or the protocol's
error (never a crash of the engine: that kills everyone's requests)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from codemoat.config import load_settings
from codemoat.engines.base import SamplingParams
from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.errors import CodemoatError
from enginehelp import batched_engine, greedy, run, served

engine = batched_engine  # the module's fixture: one batched engine of 2 slots

# a payments file with a secret in it: what the contractor must not learn that someone sent
SECRET_FILE = "".join(f"PAYMENTS_KEY_{i} = 'sk_live_{i:04d}abcdefghij'\n" for i in range(12)) + "def charge(amount):\n"


def reused(engine, prompt: str, **kw) -> int:
    """Prompt tokens this request found in a slot's cache (llama-server's `tokens_cached` of the prompt)."""
    b = engine._batcher
    before = b.reused_tokens
    run(engine.complete(prompt, greedy(**kw)))
    return b.reused_tokens - before


# ------------------------------------------------------------------- prefix cache ---
def test_a_cached_prompt_is_reused_for_its_own_user_only(engine):
    """Alice's file stays in a slot; Bob sending the same prefix gets none of it (he would see it in his time
    to first token), while Alice's next keystroke reuses it. A request without a key reuses no keyed cache."""
    assert reused(engine, SECRET_FILE, cache_key="alice") == 0
    assert reused(engine, SECRET_FILE + "    ", cache_key="bob") == 0  # the other slot: alice's stays
    assert reused(engine, SECRET_FILE + "    re", cache_key="alice") >= 32
    assert reused(engine, SECRET_FILE + "    ", cache_key=None) == 0


def test_the_one_at_a_time_engine_keeps_caches_apart_too(tiny_gguf):
    """`model.parallel = 1`: llama-cpp-python reuses any cached prefix; Bob's request evaluates the whole prompt."""
    eng = LlamaCppEngine.from_path(tiny_gguf, n_ctx=512, n_threads=1, parallel=1)
    evaluated: list[int] = []
    real = eng._llm.eval
    eng._llm.eval = lambda toks: (evaluated.append(len(toks)), real(toks))[1]
    try:

        def cost(key: str) -> int:
            evaluated.clear()
            run(eng.complete(SECRET_FILE, greedy(cache_key=key)))
            return sum(evaluated) - len(evaluated[-8:])  # the prompt, not the 8 generated tokens

        n = len(eng.tokenize(SECRET_FILE))
        assert cost("alice") >= n - 1
        assert cost("bob") >= n - 1
        assert cost("bob") < n // 2  # the same user's next request still reuses it
    finally:
        eng.close()


@pytest.fixture
def app_client(engine):
    """The real app over the module's engine, with tokens for alice and bob (two users of one server)."""

    app, tokens = served(engine, users=("alice", "bob"))
    tokens["scraper"] = app.state.accounts.create_token("scraper", scopes=["metrics"])[1]
    with TestClient(app) as c:
        c.tokens, c.holder = tokens, app.state.holder
        yield c


def test_infill_from_another_user_does_not_reuse_a_secret_prefix(app_client, engine):
    """Through /infill (llama.vscode's route, which answers `timings`): the server keys the cache by user."""
    prefix = SECRET_FILE.replace("charge", "refund")

    def infill(user: str, more: str = "") -> int:
        before = engine._batcher.reused_tokens
        r = app_client.post(
            "/infill",
            json={"input_prefix": prefix + more, "n_predict": 4, "temperature": 0},
            headers={"Authorization": f"Bearer {app_client.tokens[user]}"},
        )
        assert r.status_code == 200, r.text
        return engine._batcher.reused_tokens - before

    infill("alice")
    assert infill("bob", "    ") == 0
    assert infill("alice", "    x") >= 32


# ------------------------------------------------------------------- one user holds every slot ---
def test_a_user_with_many_requests_does_not_keep_another_waiting(engine):
    """Alice has two requests decoding on the two slots and two more waiting; then Bob sends one. Bob gets
    a slot as soon as one is free, before Alice's fourth (first come, first served started his after all of hers)."""
    lib, vocab = engine._lib, engine._vocab
    eog = [t for t in range(engine.n_vocab) if lib.llama_vocab_is_eog(vocab, t)]

    def no_end(ids, logits):  # every answer runs to max_tokens: the order is decided by admission alone
        logits[eog] = -math.inf
        return logits

    order: list[str] = []

    async def one(name: str, key: str):
        params = SamplingParams(max_tokens=200, temperature=0, cache_key=key, logits_processors=[no_end])
        async for _ in engine.stream(f"def {name}(x):\n", params):
            if name not in order:
                order.append(name)

    async def go():
        jobs = [asyncio.ensure_future(one(f"alice{i}", "alice")) for i in range(4)]
        while engine.health()["slots"] != {"total": 2, "busy": 2, "waiting": 2}:  # hers hold both slots, two wait
            await asyncio.sleep(0.002)
        jobs.append(asyncio.ensure_future(one("bob", "bob")))
        await asyncio.gather(*jobs)

    run(go())
    # alice0 and alice1 may end in the same step: bob and alice2 then start together (their first tokens
    # come in slot order); first come, first served gave both slots to alice2 and alice3
    assert order.index("bob") < order.index("alice3"), order


def test_a_cancel_storm_leaves_no_slot_or_queue_entry_behind(engine):
    """200 streams opened and dropped at once, some before their first token, some after: every slot and
    queue entry is given back and the next request is answered."""

    async def one(i: int):
        agen = engine.stream(
            f"def storm_{i}(x):\n", SamplingParams(max_tokens=64, temperature=0.8, seed=i, cache_key=f"u{i % 7}")
        )
        if i % 2:
            await agen.__anext__()
        await agen.aclose()

    async def go():
        await asyncio.gather(*(one(i) for i in range(200)))
        for _ in range(3000):  # up to 30 s: the slots come back at the engine's next steps (a loaded CI is slow)
            if engine.health()["slots"] == {"total": 2, "busy": 0, "waiting": 0}:
                break
            await asyncio.sleep(0.01)

    run(go())
    assert engine.health()["slots"] == {"total": 2, "busy": 0, "waiting": 0}
    assert run(engine.complete("x = 1\n", greedy())).completion_tokens >= 1


@pytest.mark.slow
def test_a_cancel_storm_through_a_real_server_returns_every_slot_and_place(serve_process, tiny_gguf):
    """Through `codemoat serve` (the engine in its own process, batched): 60 streams dropped by their
    clients at once, half before a token came; the cancels cross to the engine process, /health shows every
    slot free and no one waiting, the engine is the same process, and the next request is answered."""
    from conftest import create_token

    token = create_token("--name", "storm")
    srv = serve_process(["--model", str(tiny_gguf), "--n-ctx", "512"], env={"CODEMOAT_MODEL__PARALLEL": "2"})
    h = {"Authorization": f"Bearer {token}"}
    health = lambda: httpx.get(srv.url + "/health", headers=h, timeout=30).json()  # noqa: E731
    pid, model = health()["engine"].get("pid"), health()["model"]
    codes: list[int] = []

    async def storm():
        async with httpx.AsyncClient(base_url=srv.url, headers=h, timeout=60) as c:

            async def one(i: int):
                body = {"model": model, "prompt": f"def storm_{i}(x):\n", "max_tokens": 200, "temperature": 0.8, "stream": True}
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    codes.append(r.status_code)
                    if i % 2:
                        async for _ in r.aiter_lines():
                            break

            await asyncio.gather(*(one(i) for i in range(60)))

    run(storm(), timeout=120)
    assert codes == [200] * 60
    deadline = time.time() + 30
    while health()["engine"]["slots"] != {"total": 2, "busy": 0, "waiting": 0} and time.time() < deadline:
        time.sleep(0.1)
    after = health()
    assert after["engine"]["slots"] == {"total": 2, "busy": 0, "waiting": 0}
    assert pid and after["engine"]["pid"] == pid and after["engine"]["crashes"] == 0  # no crash, no restart
    r = httpx.post(
        srv.url + "/v1/completions", headers=h, json={"model": model, "prompt": "x = 1\n", "max_tokens": 4}, timeout=60
    )
    assert r.status_code == 200


# ------------------------------------------------------------------- a request the context cannot take ---
def test_a_request_for_an_adapter_the_engine_lacks_fails_alone(engine):
    """An adapter the context cannot set (not loaded, or refused by llama.cpp) fails that request in one
    line; before, the exception ended the engine's loop and every later request waited forever."""
    with pytest.raises(CodemoatError, match="no adapter named 'nope'"):
        run(engine.complete("def f(x):\n", greedy(adapter="nope")))
    assert run(engine.complete("def f(x):\n", greedy())).finish_reason in ("stop", "length")
    assert engine.health()["slots"]["busy"] == 0


# ------------------------------------------------------------------- adapters: the reverse direction ---
def test_a_base_request_never_gets_an_adapters_output_or_cells(tiny_gguf):
    """A contractor (base model) whose requests arrive among the payments team's (their adapter) in every
    order, some while the context is switching adapter sets: each contractor answer is the base's alone,
    and no prompt cell computed under the adapter is reused for the base, even with the same prompt and key."""
    from tests.tune.loras import random_lora_gguf

    fd = os.memfd_create("lora")
    os.write(fd, random_lora_gguf(tiny_gguf))
    eng = LlamaCppEngine(str(tiny_gguf), n_ctx=256, n_threads=1, parallel=3, adapters={"pay": f"/proc/self/fd/{fd}"})
    try:
        prompt = "def interchange_fee(amount_cents: int) -> int:\n    return"
        pay = run(eng.complete(prompt, greedy(max_tokens=16, adapter="pay"))).text
        b = eng._batcher
        before = b.reused_tokens
        base = run(eng.complete(prompt, greedy(max_tokens=16))).text
        assert b.reused_tokens == before  # the one slot holding the prompt computed it under the adapter
        assert base != pay

        async def mixed(order: str):
            async def one(i: int, who: str):
                await asyncio.sleep(0.003 * i)  # some arrive mid-step, some mid-switch
                a = "pay" if who == "p" else None
                return who, (await eng.complete(prompt, greedy(max_tokens=16, adapter=a))).text

            return await asyncio.gather(*(one(i, w) for i, w in enumerate(order)))

        for order in ("pcpcc", "cppcp", "ppccp", "cccpp"):
            for who, text in run(mixed(order)):
                assert text == (pay if who == "p" else base), (order, who)
    finally:
        eng.close()
        os.close(fd)


# ------------------------------------------------------------------- hostile bodies ---
@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=math.nan),
        dict(temperature=math.inf),
        dict(temperature=0.8, top_k=-5),
        dict(temperature=0.8, top_k=2**31 + 7),
        dict(temperature=0.8, top_p=math.nan),
        dict(temperature=0.8, top_p=-1.0),
        dict(temperature=0, repeat_penalty=math.nan),
        dict(temperature=0, repeat_penalty=0.0),
        dict(temperature=0.5, repeat_penalty=-1e308),
        dict(temperature=0.8, seed=2**70),
        dict(temperature=0.8, seed=-7),
        dict(temperature=0, n_indent=10**12, time_limit_ms=math.inf),
    ],
    ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()),
)
def test_odd_sampling_values_get_a_bounded_answer_and_the_engine_serves_on(engine, params):
    """Values no protocol model bounds (Ollama's repeat_penalty, seeds, top_k) reach the sampler chain: each
    request ends within max_tokens or fails in one line, and the next request is answered."""
    try:
        c = run(engine.complete("def f(x):\n", SamplingParams(max_tokens=6, **params)))
        assert c.completion_tokens <= 6
    except CodemoatError:
        pass
    assert run(engine.complete("x = 1\n", greedy())).completion_tokens >= 1


HOSTILE = [
    ("/infill", {"input_prefix": "def f(x):\n", "n_predict": 8, "t_max_predict_ms": "Infinity"}, 400),
    ("/infill", {"input_prefix": "def f(x):\n", "n_predict": 8, "stop": ["q" * 50] * 20_000}, 400),
    ("/infill", {"input_prefix": "def f(x):\n", "n_predict": 8, "stop": ["q" * 5_000]}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "def f(x):\n", "max_tokens": 8, "stop": ["q"] * 65}, 400),
    ("/api/generate", {"model": "tiny", "prompt": "def f(x):\n", "stream": False, "options": {"stop": ["q"] * 65}}, 400),
    ("/infill", {"input_prefix": "def f(x):\n", "n_predict": 8, "stop": ["\n\n", "```", "<|file_sep|>"] * 4}, 200),
    ("/infill", {"input_prefix": "def f(x):\n", "n_predict": 10**12}, 200),
    ("/infill", {"input_prefix": "def f(x):\n", "n_predict": 8, "n_indent": 10**12, "t_max_predict_ms": 1e300}, 200),
    ("/infill", {"input_prefix": "def f(\x00x):\n\x00", "input_suffix": "\x00", "n_predict": 8}, 200),
    ("/infill", {"input_prefix": "<|endoftext|>" * 600, "n_predict": 8}, 200),
    ("/infill", {"input_prefix": "<|fim_middle|><|fim_prefix|>" * 300, "n_predict": 8}, 200),
    ("/infill", {"input_prefix": "def f(x):\n", "n_predict": 8, "logit_bias": {str(i): 1e30 for i in range(5000)}}, 200),
    ("/infill", {"input_prefix": "def f(x):\n", "n_predict": 8, "seed": 2**64 - 1, "top_k": 2**31 - 1}, 200),
    ("/infill", {"input_prefix": "def f(x):\n", "n_predict": 8, "top_k": 10**12}, 400),  # past llama.cpp's int32
    ("/infill", {"input_prefix": "def f(x):\n", "n_predict": 8, "seed": 10**40}, 400),
    (
        "/api/generate",
        {"model": "tiny", "prompt": "x", "stream": False, "options": {"repeat_penalty": -5, "num_predict": -(10**30)}},
        200,
    ),
    (
        "/api/generate",
        {"model": "tiny", "prompt": "x", "stream": False, "options": {"repeat_penalty": "NaN", "num_predict": 4}},
        400,
    ),
]


@pytest.mark.parametrize("path,body,status", HOSTILE, ids=[f"{i}:{p}" for i, (p, _, _) in enumerate(HOSTILE)])
def test_hostile_bodies_get_the_protocols_answer(app_client, path, body, status):
    """Each gets a bounded answer or a one-line error in its protocol's shape, never a 500 (a traceback), and
    the engine answers the next request. Infinity was echoed in /infill's `generation_settings`, which JSON
    cannot hold: a 500 after the generation had run; thousands of stop strings slowed every slot's step."""
    raw = json.dumps(body).replace('"Infinity"', "Infinity").replace('"NaN"', "NaN")
    h = {"Authorization": f"Bearer {app_client.tokens['bob']}", "Content-Type": "application/json"}
    r = app_client.post(path, content=raw, headers=h)
    assert r.status_code == status, r.text[:300]
    if status == 400:
        err = r.json()["error"]
        msg = err if isinstance(err, str) else err["message"]
        assert "\n" not in msg and "Traceback" not in msg
    nxt = app_client.post("/infill", json={"input_prefix": "x = 1\n", "n_predict": 4}, headers=h)
    assert nxt.status_code == 200


# ------------------------------------------------------------------- a flood at the server's door ---
def test_the_servers_admission_hands_a_freed_place_to_the_user_holding_fewest(app_client):
    """`server.max_concurrent` places: a contractor who opened many requests holds them all and has more
    waiting; the payments team's request, arriving last, gets the next freed place (first come first
    served put it behind every one of the contractor's). A waiter that gives up leaks no place."""
    from codemoat.serve.admission import FairSlots

    svc = app_client.app.state.service
    assert isinstance(svc._slots, FairSlots)
    order: list[str] = []

    async def go():
        svc._slots = FairSlots(2)
        gate = asyncio.Event()

        async def request(who: str, tag: str):
            async with svc._slot(who):
                order.append(tag)
                await gate.wait()

        first = [asyncio.ensure_future(request("contractor", f"c{i}")) for i in range(2)]
        await asyncio.sleep(0)
        queued = [asyncio.ensure_future(request("contractor", f"c{i}")) for i in range(2, 6)]
        gone = asyncio.ensure_future(request("payments", "gone"))
        pay = asyncio.ensure_future(request("payments", "pay"))
        await asyncio.sleep(0)
        assert svc.waiting == 6 and order == ["c0", "c1"]
        gone.cancel()  # this client hung up while waiting
        gate.set()
        await asyncio.gather(*first, *queued, pay)
        assert svc._slots.busy == 0 and not svc._slots.held and svc.waiting == 0

    run(go())
    assert order[:3] == ["c0", "c1", "pay"], order
    assert "gone" not in order


def test_a_users_requests_waiting_past_the_cap_get_429_and_others_still_wait(app_client):
    """`server.max_waiting_per_user`: the contractor's requests beyond that many waiting are refused at once
    (429: the client backs off) instead of holding a connection and a prepared prompt each; another user
    still queues, and a refused request takes no place."""
    from codemoat.errors import RateLimited
    from codemoat.serve.admission import FairSlots

    svc = app_client.app.state.service
    assert svc._slots.max_waiting_per_user == load_settings().server.max_waiting_per_user > 0

    async def go():
        svc._slots = FairSlots(1, max_waiting_per_user=2)
        gate = asyncio.Event()

        async def request(who: str):
            async with svc._slot(who):
                await gate.wait()

        held = [asyncio.ensure_future(request("contractor")) for _ in range(3)]  # one runs, two wait
        await asyncio.sleep(0)
        with pytest.raises(RateLimited, match="2 of your requests are already waiting"):
            await request("contractor")
        pay = asyncio.ensure_future(request("payments"))
        await asyncio.sleep(0)
        assert svc._slots.waiting == 3
        gate.set()
        await asyncio.gather(*held, pay)
        assert svc._slots.busy == 0 and not svc._slots.held

    run(go())


# ------------------------------------------------------------------- the watermark key ---
def test_the_watermark_key_is_in_no_answer_error_health_metrics_or_log(app_client, caplog):
    """With the customer's watermark key on the holder (as a sealed model's license puts it): completions,
    streams, refusals (400, 429-shaped errors), /health, /metrics and the server's log never carry it, in
    any encoding; the answers are watermarked (they differ from the unkeyed ones)."""
    import base64

    key = bytes(range(7, 39))
    forms = [
        key.hex(),
        key.hex().upper(),
        base64.b64encode(key).decode(),
        base64.urlsafe_b64encode(key).decode().rstrip("="),
        repr(key),
    ]
    h = {"Authorization": f"Bearer {app_client.tokens['bob']}"}
    body = {"input_prefix": "def parse(text):\n", "n_predict": 24, "temperature": 0}
    plain = app_client.post("/infill", json=body, headers=h).json()["content"]
    app_client.holder.watermark_key = key
    try:
        seen = []
        with caplog.at_level("DEBUG"):
            r = app_client.post("/infill", json=body, headers=h)
            assert r.status_code == 200 and r.json()["content"] != plain
            seen += [r.text, str(r.headers)]
            with app_client.stream("POST", "/infill", json={**body, "stream": True}, headers=h) as s:
                seen.append("".join(s.iter_text()))
            for bad in ({**body, "seed": 2**70}, {**body, "stop": ["x"] * 100}, {**body, "temperature": -1}):
                r = app_client.post("/infill", json=bad, headers=h)
                assert r.status_code == 400
                seen.append(r.text)
            seen.append(
                app_client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4}, headers=h).text
            )
            for r in (
                app_client.get("/health", headers=h),
                app_client.get("/metrics", headers={"Authorization": f"Bearer {app_client.tokens['scraper']}"}),
            ):
                assert r.status_code == 200
                seen.append(r.text)
        seen.append(caplog.text)
        for text in seen:
            assert not any(f in text for f in forms)
    finally:
        app_client.holder.watermark_key = None


def test_a_users_flood_is_refused_before_its_prompts_are_built(engine):
    """Over HTTP: with one place taken and the contractor's one allowed request waiting, the contractor's next
    request is a 429 in the protocol's shape before its prompt is built (a prompt too long for the model,
    which building refuses with a 400, shows the order); another user's same request is built (the 400)."""
    import httpx

    app, tok = served(engine, users=("contractor", "payments"), **{"server.max_concurrent": 1, "server.max_waiting_per_user": 1})
    svc = app.state.service
    huge = {"model": "tiny", "prompt": "x = 1\n" * 3000, "max_tokens": 8}

    async def go():
        gate = asyncio.Event()

        async def hold(who: str):
            async with svc._slot(who):
                await gate.wait()

        tasks = [asyncio.ensure_future(hold("payments")), asyncio.ensure_future(hold("contractor"))]
        await asyncio.sleep(0)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            post = lambda who: c.post("/v1/completions", json=huge, headers={"Authorization": f"Bearer {tok[who]}"})  # noqa: E731
            flood, other = await post("contractor"), await post("payments")
        gate.set()
        await asyncio.gather(*tasks)
        return flood, other

    flood, other = run(go())
    assert flood.status_code == 429, flood.text
    assert "already waiting" in flood.json()["error"]["message"]
    assert other.status_code == 400 and "context" in other.json()["error"]["message"]


def test_infill_seed_4294967295_is_llama_cpps_random_seed_and_other_seeds_repeat(app_client, monkeypatch):
    """llama.cpp's server reads seed 4294967295 (LLAMA_DEFAULT_SEED) as -1: a random seed. Since 64-bit seeds are
    hashed to 32 (`engines.sampling.llama_seed`), /infill passed it on as a seed of its own, and two such requests
    answered alike; now they sample as two unseeded requests do, and a seed below it still repeats."""
    from codemoat.engines import batch

    seen = []
    real = batch.Batcher._chain

    def chain(self, p):
        seen.append(p.seed)
        return real(self, p)

    monkeypatch.setattr(batch.Batcher, "_chain", chain)
    h = {"Authorization": f"Bearer {app_client.tokens['alice']}"}
    body = {"input_prefix": "def f(x):\n", "n_predict": 8, "temperature": 1.0}
    for seed in (4294967295, 4294967294):
        assert app_client.post("/infill", json=dict(body, seed=seed), headers=h).status_code == 200
    assert seen == [None, 4294967294], seen
