"""Continuous batching in the llama.cpp engine (`engines/batch.py`): requests that decode together get
exactly what they get alone (and what the one-at-a-time engine gives), each with its own sampling
parameters, watermark and adapter; a slot's cached prefix is reused; a client that hangs up frees its
slot, in the engine and through a real server's /health."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from codemoat.engines.base import SamplingParams
from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.engines.sampling import llama_seed
from conftest import create_token
from enginehelp import run

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


# A step's rows decide which matmul kernel ggml runs (one row, or multiples of 4 on repacked weights),
# which moves a logit by up to ~1.5e-3 on these models (llama-server alike): two greedy paths may part
# where their top two logits are closer than this, and nowhere else.
NEAR_TIE = 5e-3


class Path:
    """A logits processor that changes nothing and records each greedy choice (after the repeat
    penalty, as the sampler applies it to generated tokens) with its margin over the runner-up."""

    def __init__(self, prompt_tokens: int, penalty: float):
        self.n, self.penalty, self.steps = prompt_tokens, penalty, []

    def __call__(self, history, logits):
        x = np.array(logits, dtype=np.float64)
        for t in set(int(t) for t in list(history)[self.n :][-64:]) if self.penalty != 1.0 else ():
            x[t] = x[t] / self.penalty if x[t] > 0 else x[t] * self.penalty
        a, b = np.argsort(-x)[:2]
        self.steps.append((int(a), float(x[a] - x[b])))
        return logits


def traced(eng, prompt: str, params: SamplingParams) -> tuple[SamplingParams, Path]:
    path = Path(len(eng.tokenize(prompt)), params.repeat_penalty)
    return dataclasses.replace(params, logits_processors=[path]), path


def assert_same_greedy(a, pa: Path, b, pb: Path) -> None:
    """Two greedy answers to one request: equal, or parted at a near-tie (then nothing more is compared)."""
    for k, ((ta, ma), (tb, mb)) in enumerate(zip(pa.steps, pb.steps)):
        if ta != tb:
            assert max(ma, mb) < NEAR_TIE, f"greedy paths part at token {k} with margins {ma:.2e} / {mb:.2e}: not float noise"
            return
    assert (a.text, a.finish_reason, a.completion_tokens) == (b.text, b.finish_reason, b.completion_tokens)


def test_concurrent_requests_get_what_they_get_alone(engines):
    """Six requests with four kinds of sampling parameters on three slots (so some wait for a slot): each
    greedy answer is the one the same request gets alone (its prompt now cached) and on the
    one-at-a-time engine, token for token, except where two tokens' logits are closer than float noise
    (`NEAR_TIE`: "class Stack" with a repeat penalty has a 4e-4 tie at its 4th token); run twice, the
    batch gives the same greedy answers. Batching is not bit-exact (as in llama-server): seeded sampling
    is reproducible to that noise."""
    batched, single = engines
    jobs = [(p, mixed(i)) for i, p in enumerate(PROMPTS)]
    traced_jobs = [traced(batched, p, params) for p, params in jobs]
    got = run(together(batched, [(p, tp) for (p, _), (tp, _) in zip(jobs, traced_jobs)]))
    again = [traced(batched, p, params) for p, params in jobs]
    got2 = run(together(batched, [(p, tp) for (p, _), (tp, _) in zip(jobs, again)]))
    for (p, params), g, (_, path), g2, (_, path2) in zip(jobs, got, traced_jobs, got2, again):
        if params.temperature != 0:
            continue
        assert_same_greedy(g, path, g2, path2)
        ta, pa = traced(batched, p, params)
        assert_same_greedy(g, path, run(batched.complete(p, ta)), pa)
        ts, ps = traced(single, p, params)
        assert_same_greedy(g, path, run(single.complete(p, ts)), ps)
    assert len({g.text for g in got}) == len(got)  # six different answers: the requests did not swap
    assert got[3].finish_reason == "stop" and "\n" not in got[3].text  # its stop string, not the others'
    assert batched.health()["slots"] == {"total": 3, "busy": 0, "waiting": 0}


def test_a_swap_of_answers_is_not_taken_for_float_noise(engines):
    """The attacker's case for `assert_same_greedy`: two requests' answers exchanged part with a wide margin."""
    batched, _ = engines
    (a, pa), (b, pb) = (traced(batched, p, greedy()) for p in PROMPTS[:2])
    ra, rb = run(together(batched, [(PROMPTS[0], a), (PROMPTS[1], b)]))
    with pytest.raises(AssertionError, match="not float noise"):
        assert_same_greedy(ra, pa, rb, pb)


def test_prompts_of_requests_arriving_together_are_read_in_one_decode(engines):
    """Three 49-token prompts sent together on a 64-token prefill budget: the first step's one
    `llama_decode` carries the whole first prompt and a 32-token chunk of the second (chunked prefill
    across requests: the weights are read once per step), and a prompt's last token is read in the
    step that ends its prompt (its first answer token comes from that step)."""
    batched, _ = engines
    b, calls = batched._batcher, []
    decode = b._decode
    b._decode = lambda n: calls.append(n) or decode(n)
    try:
        head = "".join(f"def fee_{i}(amount):\n    return amount * {i} // 100\n\n" for i in range(2))
        prompts = [f"# tenant {k}\n" + head for k in range(3)]
        lens = [len(batched.tokenize(p)) for p in prompts]
        assert lens == [49] * 3
        gate = threading.Event()
        batched._submit(gate.wait)  # the worker waits until all three are queued: they arrive together

        async def go():
            tasks = [asyncio.ensure_future(batched.complete(p, SamplingParams(max_tokens=2, temperature=0))) for p in prompts]
            while batched._jobs.qsize() < 3:
                await asyncio.sleep(0.01)
            gate.set()
            return await asyncio.gather(*tasks)

        got = run(go())
    finally:
        b._decode = decode
    assert all(g.completion_tokens == 2 for g in got)
    assert calls[0] == 49 + 32  # one prompt per call, in 32-token calls, read at most 32 rows at a time
    assert len(calls) == 4  # each answer's second token shares a step with the next prompt's rest


def test_seeded_sampling_differs_by_seed_when_batched(engines):
    batched, _ = engines
    mk = lambda s: SamplingParams(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, seed=s)  # noqa: E731
    got = run(together(batched, [("class ", mk(s)) for s in (1, 2, 3)]))
    assert len({g.text for g in got}) == 3


def test_a_seed_past_32_bits_is_its_own_seed_and_every_seed_repeats(engines):
    """Was: llama.cpp's sampler takes a uint32 and ctypes kept a seed's low 32 bits, so seeds 1 and 2**32 + 1 sampled
    alike, and 2**32 - 1 (llama.cpp's "random seed") gave another answer each time. Now a seed below 2**32 - 1 is
    taken as it is (llama-server's answer for it) and a larger one hashed to 32 bits, on both engines."""
    mk = lambda s: SamplingParams(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, seed=s)  # noqa: E731
    for eng in engines:  # batched, then one at a time
        text = {s: [run(eng.complete("class ", mk(s))).text for _ in range(2)] for s in (1, 2**32 + 1, 2**32 - 1, 2**64 - 1)}
        assert all(a == b for a, b in text.values()), text  # every seed repeats
        assert len({a for a, _ in text.values()}) == 4, text  # and none samples as another does
    assert (llama_seed(7), llama_seed(2**32 - 2)) == (7, 2**32 - 2)  # what llama-server does with them
    assert llama_seed(2**32 + 7) != 7 and llama_seed(2**32 - 1) != 2**32 - 1


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


def test_watermarked_answers_decoded_in_a_batch_are_detected_and_plain_ones_are_not(tiny_gguf):
    """Two watermarked (key A) and two plain sampled requests decode side by side: the detector finds A in
    each marked answer and nothing in the plain ones, and key B in none (the watermark rides with its own
    sequence's logits, whatever shares the step)."""
    from codemoat.trace import watermark as wm

    eng = LlamaCppEngine.from_path(tiny_gguf, n_ctx=512, n_threads=1, parallel=4)
    scorer = wm.LlamaScorer(str(tiny_gguf), vocab_only=True)  # every token scored (no entropies): quick, still clear
    a, b = bytes(range(32)), bytes(range(1, 33))
    try:

        def sampled(seed: int, marked: bool) -> SamplingParams:
            procs = [wm.WatermarkProcessor(a)] if marked else []
            return SamplingParams(max_tokens=160, temperature=1.0, top_k=0, top_p=1.0, seed=seed, logits_processors=procs)

        prompts = ["import os\n", "class Parser:\n", "def main(argv):\n", "# utilities\n"]
        got = run(together(eng, [(p, sampled(i, marked=i % 2 == 0)) for i, p in enumerate(prompts)]))
        for i, g in enumerate(got):
            res = {s.customer: s for s in wm.detect_text(g.text, scorer.tokenize, {"A": a, "B": b})}
            assert not res["B"].detected, (i, res)
            assert res["A"].detected == (i % 2 == 0), (i, res["A"], g.completion_tokens)
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


def common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_a_slot_reuses_its_cached_prefix(tiny_gguf):
    """The editor's next keystroke (the same file prefix, a little more) goes to the slot holding that
    prefix and evaluates only the rest, from the first token that differs (as llama-server's
    `cache_prompt`; it was re-read from the last 32-token boundary); the answer is what a fresh engine gives."""
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
        shared = common(eng.tokenize(file), eng.tokenize(file + "def fee_8(")[:-1])
        assert b.reused_tokens - before >= shared > (n_file - 1) // 32 * 32 > 0
        assert nxt.text == run(fresh.complete(file + "def fee_8(", greedy())).text
        run(eng.complete("x = 1\n", greedy()))  # unrelated: takes the least recently used slot...
        again = b.reused_tokens
        run(eng.complete(file + "def fee_9(", greedy()))
        assert b.reused_tokens - again >= shared  # ...so the file's slot still holds it
    finally:
        eng.close()
        fresh.close()


def test_each_step_samples_from_the_logits_buffer_llama_cpp_holds_after_it(tiny_gguf):
    """`Batcher._logits` keeps one numpy view per buffer address and row count: every step's view must be the
    context's output buffer as `llama_get_logits` gives it after that step, with exactly that step's rows
    (steps of one, two and three rows here), holding what a fresh view of the buffer holds."""
    import ctypes

    eng = LlamaCppEngine.from_path(tiny_gguf, n_ctx=256, n_threads=2, parallel=3)
    b, seen = eng._batcher, []
    own = b._logits

    def checked(rows):
        view = own(rows)
        ptr = b.lib.llama_get_logits(b.ctx)
        fresh = np.ctypeslib.as_array(ptr, shape=(rows, b.n_vocab))
        assert view.shape == (rows, b.n_vocab)
        assert view.__array_interface__["data"][0] == ctypes.addressof(ptr.contents)
        assert np.array_equal(view, fresh)
        seen.append(rows)
        return view

    b._logits = checked
    try:
        run(eng.complete(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0)))
        run(together(eng, [(p, SamplingParams(max_tokens=6 + 3 * i, temperature=0)) for i, p in enumerate(PROMPTS[:3])]))
    finally:
        b._logits = own
        eng.close()
    assert {1, 2, 3} <= set(seen)


def test_a_slot_never_counts_a_token_past_the_first_difference():
    """`slots.common_prefix` (list slices compared in C, the differing span halved) gives what a token-by-token
    loop gives: a cached prefix one token too long would hand a request another prompt's KV cells."""
    import random

    from codemoat.engines.slots import common_prefix

    rng = random.Random(7)
    base = [rng.randrange(50) for _ in range(2000)]
    cases = [([], []), ([], base), (base, base), (base[:10], base), ([1] + base[1:], base), (base[:-1] + [-1], base)]
    for _ in range(300):
        a = base[: rng.randrange(2001)]
        b = list(base[: rng.randrange(2001)])
        if b and rng.random() < 0.8:
            b[rng.randrange(len(b))] = -1  # one token differs
        cases.append((a, b))
    for a, b in cases:
        assert common_prefix(a, b) == common_prefix(b, a) == common(a, b)


def test_a_stream_that_is_closed_frees_its_slot(tiny_gguf):
    eng = LlamaCppEngine.from_path(tiny_gguf, n_ctx=512, n_threads=2, parallel=2)
    try:

        async def go():
            agen = eng.stream("def add(a, b):", SamplingParams(max_tokens=400, temperature=0.8, seed=1))
            await agen.__anext__()
            busy = eng.health()["slots"]["busy"]
            await agen.aclose()  # the client went away
            for _ in range(3000):  # up to 30 s: freed at the engine's next step (a loaded CI is slow)
                if eng.health()["slots"]["busy"] == 0:
                    break
                await asyncio.sleep(0.01)
            return busy, eng.health()["slots"]["busy"]

        assert run(go()) == (1, 0)
    finally:
        eng.close()


def test_a_request_whose_client_left_while_waiting_never_takes_a_slot(tiny_gguf):
    """Two streams hold both slots; a third request waits; its client hangs up. It leaves the queue at
    the next step without ever taking a slot (no prompt evaluated for it). (Without the check in
    `_admit` it waited until a stream ended, then took that slot.)"""
    eng = LlamaCppEngine.from_path(tiny_gguf, n_ctx=512, n_threads=1, parallel=2)
    b, started = eng._batcher, []
    start = b._start
    b._start = lambda seq, free: started.append(seq.ids) or start(seq, free)
    try:

        async def go():
            slow = SamplingParams(max_tokens=300, temperature=0.8, seed=1)
            holders = [eng.stream(p, slow) for p in ("def add(a, b):", "class Queue:")]
            for h in holders:
                await h.__anext__()
            late = asyncio.ensure_future(eng.complete("import this\n", greedy()))
            while eng.health()["slots"]["waiting"] != 1:
                await asyncio.sleep(0.005)
            late.cancel()  # the client hangs up while its request waits
            for _ in range(6000):  # up to 30 s (a loaded CI is slow)
                if eng.health()["slots"]["waiting"] == 0:
                    break
                await asyncio.sleep(0.005)
            waiting = eng.health()["slots"]["waiting"]
            for h in holders:
                await h.aclose()
            return waiting

        assert run(go()) == 0
        assert eng.tokenize("import this\n") not in started and len(started) == 2
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
