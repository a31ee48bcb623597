"""What the engine tests share: `run` a coroutine with a deadline, `greedy` parameters, the module's
batched engine fixture, `served`: the real app over an engine that outlives it, and `fetch_as_a_stranger`
for the vLLM hand-offs."""

from __future__ import annotations

import asyncio

import pytest

from codemoat.accounts import Accounts
from codemoat.config import load_settings
from codemoat.db import open_db
from codemoat.engines.base import SamplingParams
from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.serve.app import create_app
from kept_holder import KeptHolder


def run(coro, timeout: float = 120):
    """Run `coro` on a new event loop; a test that hangs fails after `timeout` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def greedy(**kw) -> SamplingParams:
    """Greedy sampling, 8 tokens unless `max_tokens` says otherwise."""
    return SamplingParams(**{"max_tokens": 8, "temperature": 0, **kw})


@pytest.fixture(scope="module")
def batched_engine(tiny_gguf):
    """One batched engine (2 slots) on the bundled model for the test module; each test uses prompts of its own.
    A module takes it as its `engine` with `engine = batched_engine`."""
    e = LlamaCppEngine.from_path(tiny_gguf, model_id="tiny", n_ctx=512, n_threads=1, parallel=2)
    yield e
    e.close()


def served(engine, users=("payments",), **settings) -> tuple:
    """The real app over `engine` with `settings`, and a bearer token it accepts for each of `users`."""
    holder = KeptHolder("tiny")
    holder.set(engine)
    accounts = Accounts(open_db())
    tokens = {u: accounts.create_token(u)[1] for u in users}
    return create_app(load_settings(**settings), holder=holder, accounts=accounts), tokens


def fetch_as_a_stranger(path: str, handoff) -> None:
    """`engines.vllm_handoff.fetch(path)` from a process that does not descend from this one (a double fork
    re-parents it to init), then wait (30 s at most) until `handoff` has counted its refusal."""
    import subprocess
    import sys
    import time

    code = (
        "import os,sys\n"
        "if os.fork(): os._exit(0)\n"
        "import time; time.sleep(0.3)\n"
        "from codemoat.engines.vllm_handoff import fetch\n"
        "from codemoat.errors import CodemoatError\n"
        f"try: fetch({path!r}); print('GOT', flush=True)\n"
        "except CodemoatError as e: print(e, flush=True)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    deadline = time.time() + 30
    while handoff.refused == 0 and time.time() < deadline:
        time.sleep(0.05)
