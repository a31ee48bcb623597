"""Adapters on the batched llama.cpp engine (`engines/batch.py`): requests for two adapters and the base
admitted in an adversarial order each get the answer they get alone; a slot's KV cells stay valid when
the context switches adapters for other requests (its prefix is reused under its own adapter again),
and are never reused under another adapter or the base (that reuse would hand a base user the effect of
team A's tuned weights on the prompt)."""

from __future__ import annotations

import asyncio
import os

import pytest

from codemoat.engines.base import SamplingParams
from codemoat.engines.llamacpp import LlamaCppEngine
from tests.tune.loras import random_lora_gguf

PROMPT = "def interchange_fee(amount_cents: int) -> int:\n    return"
FILE = "".join(f"def fee_{i}(amount):\n    return amount * {i} // 100\n\n" for i in range(6))


def greedy(adapter: str | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=12, temperature=0, adapter=adapter)


@pytest.fixture(scope="module")
def loras(tiny_gguf):
    fds = {"one": random_lora_gguf(tiny_gguf, seed=3), "two": random_lora_gguf(tiny_gguf, seed=4)}
    paths = {}
    for name, data in fds.items():
        fd = os.memfd_create(name)
        os.write(fd, data)
        fds[name], paths[name] = fd, f"/proc/self/fd/{fd}"
    yield paths
    for fd in fds.values():
        os.close(fd)


@pytest.fixture(scope="module")
def engines(tiny_gguf, loras):
    batched = LlamaCppEngine(str(tiny_gguf), n_ctx=256, n_threads=1, parallel=3, adapters=loras)
    single = LlamaCppEngine(str(tiny_gguf), n_ctx=256, n_threads=1, parallel=1, adapters=loras)
    yield batched, single
    batched.close()
    single.close()


def test_adversarial_adapter_order_gives_each_its_alone_answer(engines):
    batched, single = engines
    alone = {a: asyncio.run(single.complete(PROMPT, greedy(a))).text for a in (None, "one", "two")}
    assert len(set(alone.values())) == 3  # the bundled model and these adapters are fixed: no tie by chance
    # every admission can switch: each request wants another adapter set than the one before it,
    # more requests than slots, so some wait while the others run under their set
    order = [None, "one", "two", "one", None, "two", "two", None, "one", None]

    async def all_at_once():
        return await asyncio.gather(*(batched.complete(PROMPT, greedy(a)) for a in order))

    got = asyncio.run(all_at_once())
    assert [g.text for g in got] == [alone[a] for a in order]


def test_prefix_cells_survive_a_switch_and_are_never_reused_under_another_adapter(engines):
    batched, single = engines
    b = batched._batcher
    want = {a: asyncio.run(single.complete(FILE, greedy(a))).text for a in ("one", "two", None)}
    assert len(set(want.values())) == 3

    assert asyncio.run(batched.complete(FILE, greedy("one"))).text == want["one"]  # cells of FILE under one
    before = b.reused_tokens
    # slots under the base and "two" hold PROMPT (the test before): reusing the tokens it starts with
    # in common with FILE is right (prefixes are reused exactly); FILE's cells under one never are
    p, f = batched.tokenize(PROMPT), batched.tokenize(FILE)
    shared = next(i for i in range(len(f)) if p[i] != f[i])
    # the base, same prompt: the slot holding FILE under one must not lend it its cells
    assert asyncio.run(batched.complete(FILE, greedy(None))).text == want[None]
    assert b.reused_tokens - before <= shared
    assert asyncio.run(batched.complete(FILE, greedy("two"))).text == want["two"]  # nor under another adapter
    assert b.reused_tokens - before <= 2 * shared
    # back to one: its slot kept its cells through both switches, and they are reused
    assert asyncio.run(batched.complete(FILE, greedy("one"))).text == want["one"]
    assert b.reused_tokens - before >= (len(batched.tokenize(FILE)) - 1) // 32 * 32 > 0
