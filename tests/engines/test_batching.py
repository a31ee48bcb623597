"""Continuous batching in the llama.cpp engine (`engines/batch.py`): requests that decode together get
exactly what they get alone (and what the one-at-a-time engine gives), each with its own sampling
parameters, watermark and adapter; a slot's cached prefix is reused; a client that hangs up frees its
slot, in the engine and through a real server's /health."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import httpx
import pytest

from codemoat.engines.base import SamplingParams
from codemoat.engines.llamacpp import LlamaCppEngine
from conftest import create_token

HERE = Path(__file__).parent
PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\ndef read_file(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "for i in range(10):\n",
    "def quicksort(xs):\n    if len(xs) <= 1:\n",
    "# parse the config file\nimport json\n",
]


def greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=40, temperature=0, **kw)


def mixed(i: int) -> SamplingParams:
    """Different parameters per request: greedy, sampled with a seed, greedy with a repeat penalty, a stop string."""
    return [
        greedy(),
        SamplingParams(max_tokens=40, temperature=0.9, top_k=20, top_p=0.9, seed=i),
        greedy(repeat_penalty=1.3),
        greedy(stop=["\n"]),
    ][i % 4]


def run(coro):
    return asyncio.run(coro)


async def together(eng, jobs):
    return await asyncio.gather(*(eng.complete(p, params) for p, params in jobs))


@pytest.fixture(scope="module", params=["bundled", "Q4_0"])
def engines(request, tiny_gguf, quantised):
    """(batched with 3 slots, one at a time) on the bundled model and on its Q4_0 quantisation."""
    path = tiny_gguf if request.param == "bundled" else quantised(request.param)
    batched = LlamaCppEngine.from_path(path, n_ctx=512, n_threads=2, parallel=3, batch_tokens=64)
    single = LlamaCppEngine.from_path(path, n_ctx=512, n_threads=2, parallel=1)
    yield batched, single
    batched.close()
    single.close()


def test_concurrent_requests_get_what_they_get_alone(engines):
    """Six requests with four kinds of sampling parameters on three slots (so some wait for a slot): each
    greedy answer equals the same request run alone and the one-at-a-time engine's; the whole batch run
    twice gives the same answers (sampled ones are reproducible for the same batch, not across batch
    shapes: ggml picks its matmul kernel by the batch's row count, which moves logits by up to ~7e-3
    on F16 weights, as in llama-server)."""
    batched, single = engines
    jobs = [(p, mixed(i)) for i, p in enumerate(PROMPTS)]
    got = run(together(batched, jobs))
    assert [(g.text, g.finish_reason, g.completion_tokens) for g in run(together(batched, jobs))] == [
        (g.text, g.finish_reason, g.completion_tokens) for g in got
    ]
    for (p, params), g in zip(jobs, got):
        if params.temperature == 0:
            alone = run(batched.complete(p, params))
            assert (g.text, g.finish_reason, g.completion_tokens) == (alone.text, alone.finish_reason, alone.completion_tokens)
            assert run(single.complete(p, params)).text == g.text
    assert len({g.text for g in got}) == len(got)  # six different answers: the requests did not swap
    assert got[3].finish_reason == "stop" and "\n" not in got[3].text  # its stop string, not the others'
    assert batched.health()["slots"] == {"total": 3, "busy": 0, "waiting": 0}


def test_seeded_sampling_differs_by_seed_when_batched(engines):
    batched, _ = engines
    mk = lambda s: SamplingParams(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, seed=s)  # noqa: E731
    got = run(together(batched, [("class ", mk(s)) for s in (1, 2, 3)]))
    assert len({g.text for g in got}) == 3


def test_watermark_stays_with_its_request(tiny_gguf):
    """A watermarked and an unwatermarked request decoding side by side: each gets its alone answer, and
    the watermark changes the one that carries it (its processor runs on its own sequence's logits only)."""
    from codemoat.trace.watermark import WatermarkProcessor

    eng = LlamaCppEngine.from_path(tiny_gguf, n_ctx=512, n_threads=2, parallel=2)
    try:
        prompt = "def parse(text):\n"
        marked = lambda: greedy(logits_processors=[WatermarkProcessor(b"k" * 32, delta=4.0)])  # noqa: E731
        plain_alone = run(eng.complete(prompt, greedy())).text
        marked_alone = run(eng.complete(prompt, marked())).text
        assert marked_alone != plain_alone
        plain, mark = run(together(eng, [(prompt, greedy()), (prompt, marked())]))
        assert (plain.text, mark.text) == (plain_alone, marked_alone)
    finally:
        eng.close()


def test_requests_with_other_adapters_never_share_a_step(tiny_gguf):
    """llama.cpp applies adapters per context: base and adapter requests sent together each get their
    alone answer (the adapter's differs from the base's), and a cache made under one is not reused under the other."""
    from tests.tune.loras import random_lora_gguf

    fd = os.memfd_create("lora")
    os.write(fd, random_lora_gguf(tiny_gguf))
    eng = LlamaCppEngine(str(tiny_gguf), n_ctx=256, n_threads=2, parallel=3, adapters={"pay": f"/proc/self/fd/{fd}"})
    try:
        prompt = "def interchange_fee(amount_cents: int) -> int:\n    return"
        base = run(eng.complete(prompt, greedy()))
        lora = run(eng.complete(prompt, greedy(adapter="pay")))
        assert base.text != lora.text
        jobs = [(prompt, greedy(adapter=a)) for a in (None, "pay", None, "pay")]
        got = run(together(eng, jobs))
        assert [g.text for g in got] == [base.text, lora.text, base.text, lora.text]
    finally:
        eng.close()
        os.close(fd)


def test_a_slot_reuses_its_cached_prefix(tiny_gguf):
    """The editor's next keystroke (the same file prefix, a little more) goes to the slot holding that
    prefix and evaluates only the rest; the answer is what a fresh engine gives."""
    eng = LlamaCppEngine.from_path(tiny_gguf, n_ctx=512, n_threads=2, parallel=2)
    fresh = LlamaCppEngine.from_path(tiny_gguf, n_ctx=512, n_threads=2, parallel=2)
    try:
        file = "".join(f"def fee_{i}(amount):\n    return amount * {i} // 100\n\n" for i in range(8))
        run(eng.complete(file, greedy()))
        run(eng.complete("import sys\n", greedy()))  # the other slot
        b = eng._batcher
        before = b.reused_tokens
        nxt = run(eng.complete(file + "def fee_8(", greedy()))
        n_file = len(eng.tokenize(file))
        assert b.reused_tokens - before >= (n_file - 1) // 32 * 32 > 0
        assert nxt.text == run(fresh.complete(file + "def fee_8(", greedy())).text
        run(eng.complete("x = 1\n", greedy()))  # unrelated: takes the least recently used slot...
        again = b.reused_tokens
        run(eng.complete(file + "def fee_9(", greedy()))
        assert b.reused_tokens - again >= (n_file - 1) // 32 * 32  # ...so the file's slot still holds it
    finally:
        eng.close()
        fresh.close()


def test_a_stream_that_is_closed_frees_its_slot(tiny_gguf):
    eng = LlamaCppEngine.from_path(tiny_gguf, n_ctx=512, n_threads=2, parallel=2)
    try:

        async def go():
            agen = eng.stream("def add(a, b):", SamplingParams(max_tokens=400, temperature=0.8, seed=1))
            await agen.__anext__()
            busy = eng.health()["slots"]["busy"]
            await agen.aclose()  # the client went away
            for _ in range(200):
                if eng.health()["slots"]["busy"] == 0:
                    break
                await asyncio.sleep(0.01)
            return busy, eng.health()["slots"]["busy"]

        assert run(go()) == (1, 0)
    finally:
        eng.close()


@pytest.mark.slow
def test_a_hung_up_client_frees_its_slot_in_health(serve_process, tiny_gguf):
    """Through a real server (engine process, batching by default): a slow stream holds a slot, shown
    in /health; when its client hangs up the cancel crosses to the engine process and the slot is free
    long before the stream would have ended (400 tokens paced 50 ms apart: 20 s)."""
    token = create_token("--name", "batching")
    scrape = {"Authorization": f"Bearer {create_token('--name', 'scraper', '--scopes', 'metrics')}"}
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), "CODEMOAT_MODEL__PARALLEL": "2"}
    sys.path.insert(0, str(HERE))
    srv = serve_process(["--model", str(tiny_gguf), "--engine", "crash_engine:CrashingEngine", "--n-ctx", "512"], env=env)
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        slots = lambda: c.get("/health").json()["engine"]["slots"]  # noqa: E731
        assert slots() == {"total": 2, "busy": 0, "waiting": 0}
        model = c.get("/health").json()["model"]
        body = {"model": model, "prompt": "<<slow>>def add(a, b):", "max_tokens": 400, "temperature": 0.8, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            assert slots()["busy"] == 1
            assert "codemoat_engine_slots_busy 1.0" in c.get("/metrics", headers=scrape).text
        end = time.time() + 8
        while slots()["busy"] and time.time() < end:
            time.sleep(0.05)
        assert slots()["busy"] == 0
        metrics = c.get("/metrics", headers=scrape).text
        assert "codemoat_engine_slots_busy 0.0" in metrics and "codemoat_engine_slots_total 2.0" in metrics
        ok = c.post("/v1/completions", json={"model": model, "prompt": "def ", "max_tokens": 3, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
