"""An engine crash is an incident, not a silent death: the engine runs in a supervised child process.

A real `codemoat serve` runs the test-only `crash_engine.CrashingEngine` (llama.cpp with prompt
markers that SIGSEGV the engine's process): the crashing request gets 503 in OpenAI and Ollama
shapes, a stream in flight ends with an in-band error, the audit log records `engine_crashed`
with the signal, /health shows the restart, the next request is answered, and repeated crashes
restart the engine with its safe options (llama.cpp: use_extra_bufts=False).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import create_token, run_cli

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
ENGINE = "crash_engine:CrashingEngine"
ENV = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
# the request after a restart, greedy: at OpenAI's default temperature 1 its first token can end the answer
SERVED = {"prompt": "def add(a, b):\n", "max_tokens": 4, "temperature": 0}


def wait_ready(c: httpx.Client, seconds: float = 60) -> dict:
    end = time.time() + seconds
    while time.time() < end:
        r = c.get("/health")
        if r.status_code == 200:
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"not ready again: {c.get('/health').text}")


def crashes(home: Path | None = None) -> list[dict]:
    r = run_cli("audit", "export", "--kind", "engine_crashed")
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def detail(record: dict) -> dict:
    d = record["detail"]
    return json.loads(d) if isinstance(d, str) else d


def crashing_engine(monkeypatch, tiny_gguf, backoff_s: float | None = 0.2, parallel: int = 1, **kw):
    """A `SupervisedEngine` over `crash_engine.CrashingEngine` (n_ctx 256, one thread, `parallel` slots; its engine
    process imports crash_engine too) with restarts `backoff_s` apart, and the list its incidents go to."""
    from codemoat.engines import restarts, supervised
    from crash_engine import CrashingEngine

    if backoff_s is not None:
        monkeypatch.setattr(restarts, "BACKOFF_S", (backoff_s,))
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    opts = {"model_id": "tiny", "n_ctx": 256 * parallel, "n_threads": 1, "parallel": parallel}
    eng = supervised.SupervisedEngine.start(CrashingEngine, tiny_gguf, opts, **kw)
    incidents: list = []
    eng.on_incident = lambda kind, detail: incidents.append((kind, detail))
    return eng, incidents


@pytest.fixture
def server(serve_process, tiny_gguf):
    token = create_token("--name", "crash")
    srv = serve_process(["--model", str(tiny_gguf), "--engine", ENGINE, "--n-ctx", "512"], env=ENV)
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        c.srv = srv
        yield c


def test_a_crash_is_answered_audited_and_restarted(server):
    c = server
    model = c.get("/v1/models").json()["data"][0]["id"]
    pid = wait_ready(c)["engine"]["pid"]
    assert pid != c.srv.proc.pid and c.get("/health").json()["engine"]["isolation"] == "process"

    # a client streaming when the engine dies
    seen: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": model, "prompt": "<<slow>>def add(a, b):", "max_tokens": 200, "temperature": 0.8, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            seen.append(str(r.status_code))
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen.append(line[6:])
                    started.set()
        started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(30)

    r = c.post("/v1/completions", json={"model": model, "prompt": "<<crash>>def f(", "max_tokens": 8})
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert "crashed (SIGSEGV)" in err["message"] and "restarting" in err["message"]
    assert err["code"] == "model_unavailable"
    t.join(60)
    assert seen[0] == "200" and seen[-1] == "[DONE]"
    assert "crashed (SIGSEGV)" in json.loads(seen[-2])["error"]["message"]  # a clean in-band error, then the end

    h = wait_ready(c)
    assert h["state"] == "loaded" and h["engine"]["crashes"] == 1 and h["engine"]["last_signal"] == "SIGSEGV"
    assert h["engine"]["restarts"] == 1 and h["engine"]["pid"] != pid
    assert c.srv.proc.poll() is None  # the server itself never went down

    # Ollama's shape for the same crash
    r = c.post("/api/generate", json={"model": model, "prompt": "<<crash>>", "stream": False})
    assert r.status_code == 503 and "crashed (SIGSEGV)" in r.json()["error"]

    h = wait_ready(c)
    assert h["engine"]["crashes"] == 2 and h["engine"]["restarts"] == 2
    r = c.post("/v1/completions", json={"model": model, "prompt": "def add(a, b):\n", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]

    records = crashes()
    assert len(records) == 2
    assert all(detail(x)["signal"] == "SIGSEGV" and x["model"] == model for x in records)
    assert "died with SIGSEGV" in c.srv.output()


def test_repeated_crashes_restart_on_the_safe_path(server):
    c = server
    model = c.get("/v1/models").json()["data"][0]["id"]
    h = wait_ready(c)
    assert h["engine"]["safe_options"] is False and h["engine"]["built_safe"] is False
    body = {"model": model, "prompt": "<<crash-unless-safe>>def f(", "max_tokens": 4}
    for n in (1, 2):
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 503, r.text
        h = wait_ready(c)
        assert h["engine"]["crashes"] == n
    # two crashes on the same configuration: restarted with use_extra_bufts=False, where it works
    assert h["engine"]["safe_options"] is True and h["engine"]["built_safe"] is True
    assert h["engine"]["cpu_buffers"]["path"] == "safe"
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert [detail(x)["safe_options"] for x in crashes()] == [False, True]
    assert sum("restarting it with use_extra_bufts=False" in line for line in c.srv.output().splitlines()) == 1


def test_one_crash_does_not_choose_the_safe_path(server):
    """The negative beside the one above: a single crash restarts on the same (fast) configuration."""
    c = server
    model = c.get("/v1/models").json()["data"][0]["id"]
    r = c.post("/v1/completions", json={"model": model, "prompt": "<<crash-unless-safe>>", "max_tokens": 4})
    assert r.status_code == 503
    h = wait_ready(c)
    assert h["engine"]["crashes"] == 1 and h["engine"]["safe_options"] is False and h["engine"]["built_safe"] is False
    assert "use_extra_bufts=False" not in c.srv.output()


def test_restarting_state_and_holder(tiny_gguf, monkeypatch):
    """In-process view of the same: while the engine restarts, the holder is not ready and says why;
    a request then gets Unavailable, and the sealed-model memfd path is kept for the restart."""
    from codemoat.engines import restarts, supervised
    from codemoat.engines.holder import ModelHolder
    from codemoat.engines.base import SamplingParams
    from codemoat.errors import Unavailable
    from crash_engine import CrashingEngine

    monkeypatch.setattr(restarts, "BACKOFF_S", (1.5,))
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])  # the engine process imports crash_engine too
    opts = {"model_id": "tiny", "n_ctx": 256, "n_threads": 1, "n_gpu_layers": 0}
    events: list[tuple[str, dict]] = []
    holder = ModelHolder("tiny", loader=lambda: supervised.SupervisedEngine.start(CrashingEngine, tiny_gguf, opts))
    holder.incidents.append(lambda kind, d: events.append((kind, d)))
    holder.load()
    try:
        eng = holder.get()
        first = asyncio.run(eng.complete("def add(a, b):\n", SamplingParams(max_tokens=4, temperature=0)))
        os.kill(eng._child.proc.pid, signal.SIGSEGV)
        end = time.time() + 10
        while not events and time.time() < end:
            time.sleep(0.01)
        assert events and events[0][0] == "engine_crashed" and events[0][1]["signal"] == "SIGSEGV"
        assert events[0][1]["model"] == "tiny"
        assert holder.state == "restarting" and not holder.ready and holder.loaded
        with pytest.raises(Unavailable, match=r"restarting after a crash \(SIGSEGV\)"):
            asyncio.run(eng.complete("def", SamplingParams(max_tokens=2)))
        while not holder.ready and time.time() < end:
            time.sleep(0.02)
        assert holder.ready and eng.restarts == 1
        again = asyncio.run(eng.complete("def add(a, b):\n", SamplingParams(max_tokens=4, temperature=0)))
        assert again.text == first.text  # the same model, served again
    finally:
        holder.close()
    assert eng.state == "closed"


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_a_request_on_an_engine_closed_under_it_is_told_why(tiny_gguf, monkeypatch, isolation):
    """CI flake of test_serve_sealed's revocation (session 9), made deterministic: a request took the engine
    from the holder, then the lease keeper unloaded it (license revoked) before the request reached it. It
    got "engine closed" (a supervised engine's 503) or "engine is closed" (an inline engine's 400), and a
    stream in flight got "engine closed" too; now each is a 503 that names the holder's reason."""
    from codemoat.engines import supervised
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.holder import ModelHolder
    from codemoat.errors import Unavailable
    from crash_engine import SLOW, CrashingEngine

    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    opts = {"model_id": "tiny", "n_ctx": 256, "n_threads": 1, "n_gpu_layers": 0}
    if isolation == "process":
        holder = ModelHolder("tiny", loader=lambda: supervised.SupervisedEngine.start(CrashingEngine, tiny_gguf, opts))
    else:
        holder = ModelHolder("tiny", loader=lambda: CrashingEngine.from_path(tiny_gguf, **opts))
    holder.load()
    why = "license L-1 was revoked by the vendor"
    p = SamplingParams(max_tokens=4, temperature=0)

    async def go() -> None:
        eng = holder.get()  # the request takes the engine ...
        agen = None
        if isolation == "process":  # (an inline engine lets its generation in flight finish)
            agen = eng.stream(SLOW + "def add(a, b):", SamplingParams(max_tokens=100, temperature=0.8))
            await agen.__anext__()
        holder.unload(why)  # ... and the lease keeper's thread unloads it before the request reaches it
        with pytest.raises(Unavailable, match=f"model 'tiny' is not available: {why}$"):
            await eng.complete("def add(a, b):\n", p)
        if agen is not None:
            with pytest.raises(Unavailable, match=f"model 'tiny' is not available: {why}$"):
                async for _ in agen:
                    pass
        with pytest.raises(Unavailable, match=why):  # and a request that comes after is told by the holder
            holder.get()

    try:
        asyncio.run(go())
    finally:
        holder.close()


def test_a_client_that_leaves_cancels_generation_in_the_engine_process(tiny_gguf, monkeypatch):
    """Closing a stream sends a cancel across: the engine's worker stops the paced 400-token generation
    (20 s uncancelled) and takes the next request."""
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.supervised import SupervisedEngine
    from crash_engine import CrashingEngine

    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    eng = SupervisedEngine.start(CrashingEngine, tiny_gguf, {"model_id": "tiny", "n_ctx": 512, "n_threads": 1, "n_gpu_layers": 0})

    async def go():
        agen = eng.stream("<<slow>>def add(a, b):", SamplingParams(max_tokens=400, temperature=0.8))
        first = await agen.__anext__()
        await agen.aclose()  # the client went away
        nxt = await asyncio.wait_for(eng.complete("def ", SamplingParams(max_tokens=3, temperature=0)), 10)
        return first, nxt

    try:
        first, nxt = asyncio.run(go())
        assert first.text and nxt.completion_tokens == 3
        assert eng.health()["queue"] == 0 and eng.crashes == 0
    finally:
        eng.close()


def test_a_frame_the_server_cannot_read_fails_its_requests_and_restarts_the_engine(tiny_gguf, monkeypatch):
    """A message from the engine process that does not unpickle (here TypeError, not an UnpicklingError)
    or has no known shape. Before, the reading loop's callback raised on it at each read, the frame stayed
    at the head of the buffer, and that request and every later one on the engine waited for good while
    /health said ready. Now it is the engine's end: its requests get 503 and the engine restarts."""
    from codemoat.engines.base import SamplingParams
    from codemoat.errors import Unavailable
    from crash_engine import BAD_FRAME

    eng, _ = crashing_engine(monkeypatch, tiny_gguf)
    p = SamplingParams(max_tokens=4, temperature=0)
    try:
        want = asyncio.run(eng.complete("def add(a, b):\n", p)).text

        async def bad():
            with pytest.raises(Unavailable):
                await asyncio.wait_for(eng.complete(BAD_FRAME + "def add(a, b):\n", p), 30)

        asyncio.run(bad())
        end = time.time() + 30
        while eng.state != "ready" and time.time() < end:
            time.sleep(0.05)
        assert eng.state == "ready" and eng.restarts == 1
        assert asyncio.run(eng.complete("def add(a, b):\n", p)).text == want
    finally:
        eng.close()


def test_an_engine_process_that_stops_reading_is_hung_and_restarted(tiny_gguf, monkeypatch):
    """The engine process's reader stops for good (`<<stop-reading>>`) while requests keep coming: once
    its socket is full, the server's send (on the event loop) took no byte and waited for good, and so
    did every request of the server. Now a send that moves nothing for `inbox.STALL_S` finds the
    process hung: it is killed, its requests get 503, an `engine_crashed` incident says hung, and the
    engine restarts and answers as before."""
    from codemoat.engines import inbox
    from codemoat.engines.base import SamplingParams
    from codemoat.errors import Unavailable
    from crash_engine import STOP_READING

    monkeypatch.setattr(inbox, "STALL_S", 1.0, raising=False)
    eng, incidents = crashing_engine(monkeypatch, tiny_gguf)
    p = SamplingParams(max_tokens=4, temperature=0)
    failed: list = []
    try:
        want = asyncio.run(eng.complete("def add(a, b):\n", p)).text

        async def flood() -> None:  # the hanging request, then far more requests than its socket holds
            async def one(prompt: str) -> None:
                try:
                    await eng.complete(prompt, p)
                except Unavailable as e:
                    failed.append(e)

            first = asyncio.ensure_future(one(STOP_READING + "def add(a, b):\n"))
            await asyncio.sleep(0.5)
            await asyncio.gather(first, *(one(f"# {i}\n" + "x = 1\n" * 40) for i in range(3000)))

        t = threading.Thread(target=lambda: asyncio.run(flood()), daemon=True)
        t.start()
        t.join(60)
        waited = t.is_alive()
        if waited and eng._child is not None:
            eng._child.proc.kill()  # the server waited on the hung process for good: let the test end
            t.join(60)
        assert not waited, "the server's requests waited on the hung engine process"
        assert len(failed) == 3001
        end = time.time() + 30
        while eng.state != "ready" and time.time() < end:
            time.sleep(0.05)
        assert eng.state == "ready" and eng.restarts == 1
        assert [(k, d["hung"]) for k, d in incidents] == [("engine_crashed", True)]
        assert asyncio.run(eng.complete("def add(a, b):\n", p)).text == want
    finally:
        eng.close()


def test_a_stalled_send_never_holds_the_event_loop(tiny_gguf, monkeypatch):
    """Session 9's hung-engine fix still sent on the event loop: a send the engine process did not take
    waited there up to `inbox.STALL_S` (10 s), and every other client's stream and /health with it. Here the
    engine's reader stops (`<<stop-reading>>`) while a paced stream of another client runs on its worker,
    and 2,000 more requests fill the socket: with STALL_S an hour, the paced stream must still reach its
    end and /health answer on the same loop while the sends wait (before: the loop sat in the first send
    that did not go out)."""
    from codemoat.engines import inbox
    from codemoat.engines.base import SamplingParams
    from codemoat.errors import Unavailable
    from crash_engine import SLOW, STOP_READING

    monkeypatch.setattr(inbox, "STALL_S", 3600.0)
    eng, _ = crashing_engine(monkeypatch, tiny_gguf, backoff_s=None)
    p = SamplingParams(max_tokens=4, temperature=0)
    seen: dict = {}

    async def go() -> None:
        paced = eng.stream(SLOW + "def add(a, b):", SamplingParams(max_tokens=30, temperature=0.8))
        chunks = [await paced.__anext__()]
        stuck = [asyncio.ensure_future(eng.complete(STOP_READING + "def f(", p))]
        await asyncio.sleep(0.3)  # its reader has taken that one and stopped
        filler = [1] * 200  # token ids: ~420 bytes a request, 2,000 of them far past both socket buffers
        stuck += [asyncio.ensure_future(eng.complete(filler, p)) for _ in range(2000)]
        await asyncio.sleep(0)  # every send has been tried
        seen["waiting"] = len(eng._child.inbox._out)
        async for c in paced:  # the other client's stream moves on while those sends wait
            chunks.append(c)
        seen["paced"] = chunks[-1].finish_reason
        seen["health"] = eng.health()["state"]
        seen["crashes"] = eng.crashes
        os.kill(eng._child.proc.pid, signal.SIGKILL)  # the end of the test: every waiting request is answered
        seen["ended"] = [type(e) for e in await asyncio.gather(*stuck, return_exceptions=True)]

    t = threading.Thread(target=lambda: asyncio.run(go()), daemon=True)
    try:
        t.start()
        t.join(60)
        held = t.is_alive()
        if held and eng._child is not None:
            eng._child.proc.kill()  # the loop sat in a send to the hung process: let the test end
            t.join(60)
        assert not held, "the event loop waited in a send to the hung engine process"
        assert seen["waiting"] > 0  # the sends did stall (nothing taken), without holding the loop
        assert seen["paced"] is not None and seen["health"] == "ready" and seen["crashes"] == 0
        assert set(seen["ended"]) == {Unavailable} and len(seen["ended"]) == 2001
    finally:
        eng.close()


@pytest.mark.parametrize("parallel", [1, 2], ids=["one-at-a-time", "batched"])
def test_an_engine_that_owes_answers_and_does_nothing_is_restarted(tiny_gguf, monkeypatch, parallel):
    """The engine process's reader stops (`<<stop-reading>>`) and the server sends nothing more, so no
    send stalls: the request waited for good, and so did /health's "ready". Now an engine that owes an
    answer, sends nothing and computes nothing for `answer_timeout_s` is hung: the request gets 503
    ("stopped answering"), an `engine_crashed` incident says hung, and the engine restarts and answers."""
    from codemoat.engines.base import SamplingParams
    from codemoat.errors import Unavailable
    from crash_engine import STOP_READING

    eng, incidents = crashing_engine(monkeypatch, tiny_gguf, parallel=parallel, answer_timeout_s=1.0)
    assert eng._child.facts["reads_on_loop"] is (parallel > 1)  # batched: the loop that is stuck is the reader
    p = SamplingParams(max_tokens=4, temperature=0)
    got: list = []
    try:
        want = asyncio.run(eng.complete("def add(a, b):\n", p)).text

        async def stuck() -> None:
            try:
                await eng.complete(STOP_READING + "def add(a, b):\n", p)
            except Unavailable as e:
                got.append(str(e))

        t = threading.Thread(target=lambda: asyncio.run(stuck()), daemon=True)
        t.start()
        t.join(60)
        waited = t.is_alive()
        if waited and eng._child is not None:
            eng._child.proc.kill()  # it waited on the hung process for good: let the test end
            t.join(60)
        assert not waited, "the request waited on a hung engine process for good"
        assert got and "stopped answering" in got[0]
        end = time.time() + 30
        while not incidents and time.time() < end:  # reported after its requests were answered
            time.sleep(0.01)
        assert [(k, d["hung"]) for k, d in incidents] == [("engine_crashed", True)]
        while eng.state != "ready" and time.time() < end:
            time.sleep(0.05)
        assert eng.state == "ready" and eng.restarts == 1 and eng.last_exit == "hung"
        assert asyncio.run(eng.complete("def add(a, b):\n", p)).text == want
    finally:
        eng.close()


def test_an_engine_that_stops_answering_is_a_503_through_serve(serve_process, tiny_gguf):
    """`model.answer_timeout_s` through a real `codemoat serve`: the engine process's reader stops, and the
    request that waits on it gets 503 in OpenAI's shape (before: no answer ever came); /health shows the
    hung engine restarted, and the next request is served."""
    token = create_token("--name", "hung")
    env = {**ENV, "CODEMOAT_MODEL__ANSWER_TIMEOUT_S": "3"}
    srv = serve_process(["--model", str(tiny_gguf), "--engine", ENGINE, "--n-ctx", "512"], env=env)
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
        r = c.post("/v1/completions", json={"model": model, "prompt": "<<stop-reading>>def f(", "max_tokens": 4})
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert "stopped answering" in err["message"] and err["code"] == "model_unavailable", err
        h = wait_ready(c)
        assert h["engine"]["last_exit"] == "hung" and h["engine"]["restarts"] == 1, h
        r = c.post("/v1/completions", json={**SERVED, "model": model})
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text


def test_an_engine_that_spins_without_a_step_is_a_503_audited_and_restarted(serve_process, tiny_gguf):
    """`model.spin_timeout_s` through a real `codemoat serve` (batching: parallel 4): the engine process's batch
    loop spins for good, busy, making no step and sending nothing. The answer watchdog took its busy threads
    for a prefill's work, so the request waited for the client's timeout (120 s here) and no record of the
    hang was written. Now the request gets 503 in OpenAI's shape after about 3 s on a core, /health shows the engine
    restarted, the request and the incident are audited, and the next request is served."""
    token = create_token("--name", "spin")
    env = {**ENV, "CODEMOAT_MODEL__SPIN_TIMEOUT_S": "3"}
    srv = serve_process(["--model", str(tiny_gguf), "--engine", ENGINE, "--n-ctx", "512"], env=env)
    # 3 s on a core can take a minute of wall time for a starved engine (nice 19 beside a benchmark)
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
        assert wait_ready(c)["engine"]["slots"]["total"] == 4  # the batching engine: it counts its steps
        r = c.post("/v1/completions", json={"model": model, "prompt": "<<spin>>def f(", "max_tokens": 4})
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert "stopped answering" in err["message"] and err["code"] == "model_unavailable", err
        h = wait_ready(c)
        assert h["engine"]["last_exit"] == "hung" and h["engine"]["restarts"] == 1, h
        assert "made no step" in srv.output()
        (record,) = crashes()
        assert detail(record)["hung"] is True and record["model"] == model
        assert "made no step" in detail(record)["why"]  # the audit record says which watchdog found it
        out = run_cli("audit", "export", "--kind", "request")
        assert out.returncode == 0 and [x for x in map(json.loads, out.stdout.splitlines()) if x["status"] == 503]
        r = c.post("/v1/completions", json={**SERVED, "model": model})
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text


def test_a_long_prefill_that_steps_is_progress_not_a_spin(tiny_gguf, monkeypatch):
    """What the spin watchdog counts as progress: a batching engine reading a long prompt sends nothing until
    its first token, but makes a step (one llama_decode of at most ALIGN prompt tokens) every `STEP_S`. With
    `spin_timeout_s` well under the prefill's silence, the answer comes in full and nothing is restarted
    (a watchdog of silence and busy threads alone, or one that never saw the steps, cuts it)."""
    from codemoat.engines import supervised
    from codemoat.engines.base import SamplingParams
    from crash_engine import SLOW_STEPS, STEP_S, CrashingEngine

    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    opts = {"model_id": "tiny", "n_ctx": 1024, "n_threads": 1, "parallel": 2, "batch_tokens": 32}
    eng = supervised.SupervisedEngine.start(CrashingEngine, tiny_gguf, opts, spin_timeout_s=2 * STEP_S + 0.5)
    incidents: list = []
    eng.on_incident = lambda kind, detail: incidents.append((kind, detail))
    prompt = SLOW_STEPS + "x = 1\n" * 60  # about ten prompt steps before the first token

    async def first_token_after() -> tuple[float, int]:
        start, first, n = time.monotonic(), None, 0
        async for chunk in eng.stream(prompt, SamplingParams(max_tokens=3, temperature=0)):
            first = first if first is not None else time.monotonic() - start
            n += len(chunk.token_ids)
        return first, n

    try:
        silent, n = asyncio.run(first_token_after())
        assert silent > 2 * eng.spin_timeout_s and n == 3, (silent, n)  # silent past the limit (on a core, too), yet stepping
        assert incidents == [] and eng.crashes == 0 and eng.state == "ready"
    finally:
        eng.close()


def test_a_long_silent_prefill_is_progress_not_a_hang(tiny_gguf, monkeypatch):
    """What the answer watchdog counts as progress: a prefill sends nothing until its first token but
    computes (or, on a loaded machine, waits for a core to). An engine that computes for
    `crash_engine.SILENT_WORK_S` before its first token, with `answer_timeout_s` a sixth of that,
    answers in full, and nothing is restarted (a watchdog of silence alone kills it)."""
    from codemoat.engines.base import SamplingParams
    from crash_engine import SILENT_WORK, SILENT_WORK_S

    eng, incidents = crashing_engine(monkeypatch, tiny_gguf, backoff_s=None, answer_timeout_s=SILENT_WORK_S / 6)
    try:
        out = asyncio.run(eng.complete(SILENT_WORK + "def add(a, b):\n", SamplingParams(max_tokens=4, temperature=0)))
        assert out.completion_tokens == 4
        assert incidents == [] and eng.crashes == 0 and eng.state == "ready"
    finally:
        eng.close()


def test_a_cancel_storm_never_gives_a_request_another_ones_tokens(tiny_gguf):
    """Clients that hang up after their first chunk, beside clients that read to the end, on a batching
    engine process: every finished answer is its own prompt's answer token for token (request ids are
    never reused, and a message for a request gone is dropped), and the engine is left with nothing queued."""
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.llamacpp import LlamaCppEngine
    from codemoat.engines.supervised import SupervisedEngine

    eng = SupervisedEngine.start(LlamaCppEngine, tiny_gguf, {"model_id": "tiny", "n_ctx": 1024, "n_threads": 1, "parallel": 4})
    p = SamplingParams(max_tokens=12, temperature=0)
    prompts = ["def add(a, b):\n", "import json\n", "class Stack:\n", "for i in range(10):\n"]
    try:
        want = {q: asyncio.run(eng.complete(q, p)).text for q in prompts}
        assert len(set(want.values())) == len(prompts)  # each prompt's answer tells it apart

        async def leave(q: str) -> None:
            agen = eng.stream(q, SamplingParams(max_tokens=200, temperature=0.8))
            await agen.__anext__()
            await agen.aclose()

        async def storm() -> list[tuple[str, str]]:
            tasks = []
            for i in range(24):
                q = prompts[i % len(prompts)]
                tasks.append(leave(q) if i % 2 else eng.complete(q, p))
            got = await asyncio.gather(*tasks)
            return [(prompts[i % len(prompts)], g.text) for i, g in enumerate(got) if i % 2 == 0]

        for q, text in asyncio.run(storm()):
            assert text == want[q], (q, text)
        assert eng.health()["queue"] == 0 and eng.crashes == 0
    finally:
        eng.close()


def test_an_engine_process_whose_server_is_gone_exits_though_its_loop_is_stuck(tiny_gguf, monkeypatch):
    """The server went away (its end of the socket closed, no "stop") while the batch loop is stuck (a job that
    sleeps for good): the engine process exits within `child.GONE_EXIT_S` instead of waiting 30 s for the loop
    to stop, the decrypted model still in its memory while a restarted server loads another copy."""
    from codemoat.engines import child as child_mod
    from codemoat.engines.base import SamplingParams
    from crash_engine import BLOCK

    eng, _ = crashing_engine(monkeypatch, tiny_gguf, parallel=2, backoff_s=30)
    proc = eng._child.proc
    try:

        async def blocked() -> None:
            with contextlib.suppress(Exception):
                await eng.complete(BLOCK + "def f():\n", SamplingParams(max_tokens=2))

        t = threading.Thread(target=lambda: asyncio.run(blocked()), daemon=True)
        t.start()
        time.sleep(1.0)  # the loop took the job and sleeps in it
        assert proc.poll() is None
        t0 = time.monotonic()
        eng._child.sock.shutdown(socket.SHUT_RDWR)  # the server's end goes away, as when it is killed
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(child_mod.GONE_EXIT_S + 8)
        assert proc.poll() is not None, "the engine process waited for its stuck loop"
        assert time.monotonic() - t0 < child_mod.GONE_EXIT_S + 8
    finally:
        proc.kill()
        eng.close()


def test_a_model_that_cannot_load_is_one_line(tmp_path):
    from codemoat.config import load_settings
    from codemoat.engines.loader import open_model
    from codemoat.errors import CodemoatError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(CodemoatError, match="cannot load model") as e:
        open_model(load_settings(**{"model.path": str(bad)}))
    assert "\n" not in str(e.value)


def _switches(pid: int, tid: int) -> int:
    """Times thread `tid` of process `pid` went to sleep (voluntary context switches): one per wake-up."""
    for line in open(f"/proc/{pid}/task/{tid}/status"):
        if line.startswith("voluntary_ctxt_switches"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def _all_switches(pid: int) -> int:
    """Wake-ups of every thread of process `pid`."""
    return sum(_switches(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task"))


def test_tokens_cross_with_one_wake_up_each_not_three(tiny_gguf):
    """Issue 15: the process boundary cost ~5 % CPU per request, wake-ups per token. The streaming loop
    reads the engine's socket itself: the server's reader thread sleeps through a stream (it woke once
    per token, then woke the loop), and the engine process's request reader is not woken each time the
    server reads a token (a blocking read of a socket was: ~one wake-up per token)."""
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.llamacpp import LlamaCppEngine
    from codemoat.engines.supervised import SupervisedEngine

    eng = SupervisedEngine.start(LlamaCppEngine, tiny_gguf, {"model_id": "tiny", "n_ctx": 512, "n_threads": 1, "parallel": 2})
    try:
        pid, child = os.getpid(), eng._child.proc.pid
        reader = next(t for t in threading.enumerate() if t.name == f"engine-{child}").native_id

        async def go() -> tuple[int, int, int, float]:
            await eng.complete("def f(", SamplingParams(max_tokens=2))  # the first request attaches this loop
            before, t0 = (_switches(pid, reader), _all_switches(child)), time.monotonic()
            n = 0
            for _ in range(3):
                async for chunk in eng.stream("import os\n\ndef main():\n", SamplingParams(max_tokens=48, temperature=0)):
                    n += len(chunk.token_ids)
            return n, _switches(pid, reader) - before[0], _all_switches(child) - before[1], time.monotonic() - t0

        tokens, server, engine, seconds = asyncio.run(go())
        assert tokens >= 60, tokens  # enough tokens that one wake-up each would show
        # the reader thread checks once a second that the loop which reads still runs
        assert server <= 2 + seconds, f"the server's reader thread woke {server} times for {tokens} tokens in {seconds:.1f} s"
        # the engine process's batch loop reads the requests itself (`serve_on_loop`): it sleeps between them,
        # not between tokens, and no other thread of that process wakes
        assert engine <= 9, f"the engine process's threads woke {engine} times for {tokens} tokens"
    finally:
        eng.close()


def test_answers_reach_every_loop_and_a_synchronous_caller(tiny_gguf):
    """Who reads the engine's socket changes hands (a loop that streams, the thread while no loop runs, a
    loop on another thread): every caller still gets its whole answer, and a crash is noticed without a loop."""
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.llamacpp import LlamaCppEngine
    from codemoat.engines.supervised import SupervisedEngine

    eng = SupervisedEngine.start(LlamaCppEngine, tiny_gguf, {"model_id": "tiny", "n_ctx": 512, "n_threads": 1, "parallel": 2})
    p = SamplingParams(max_tokens=16, temperature=0)
    try:
        want = asyncio.run(eng.complete("def add(a, b):\n", p)).text
        assert want
        assert eng.logits("def add(a, b):\n").shape[0] == eng.n_vocab  # no loop runs now: the thread reads
        assert asyncio.run(eng.complete("def add(a, b):\n", p)).text == want  # a new loop reads again

        other: list[str] = []

        def elsewhere() -> None:  # a second loop, on another thread, at the same time as this one
            async def go():
                return [(await eng.complete("def add(a, b):\n", p)).text for _ in range(3)]

            other.extend(asyncio.run(go()))

        t = threading.Thread(target=elsewhere)
        t.start()

        async def here():
            return await asyncio.gather(*(eng.complete("def add(a, b):\n", p) for _ in range(3)))

        mine = [c.text for c in asyncio.run(here())]
        t.join(60)
        assert mine == [want] * 3 and other == [want] * 3

        events: list[str] = []
        eng.on_incident = lambda kind, d: events.append(kind)
        os.kill(eng._child.proc.pid, signal.SIGKILL)  # no loop is running: the thread notices
        end = time.time() + 10
        while not events and time.time() < end:
            time.sleep(0.01)
        assert events == ["engine_crashed"]
    finally:
        eng.close()


def test_a_send_that_cannot_go_out_never_waits():
    """The engine process may be blocked writing tokens to the server while the server writes a long
    prompt to it. The server's send returns at once (on the event loop it held every other client), and
    the inbox's thread writes the rest as the engine reads while it reads and delivers what the engine
    sent: neither waits for the other for ever, and every message arrives in order."""
    from codemoat.engines.child import Frames, frame
    from codemoat.engines.inbox import Inbox

    ours, theirs = socket.socketpair()
    seen: list[int] = []
    ended = threading.Event()
    inbox = Inbox(ours, Frames(ours), lambda rid: None, lambda usage: seen.append(usage["i"]), ended.set, "test")
    big = b"p" * (8 << 20)  # far more than both socket buffers
    go = threading.Event()
    got = bytearray()

    def engine() -> None:  # writes all its messages before it reads anything, and reads only once told
        for i in range(20_000):
            theirs.sendall(frame(("slots", 0, {"i": i})))
        go.wait()
        while len(got) < 2 * len(big):
            got.extend(theirs.recv(1 << 20))

    t = threading.Thread(target=engine, daemon=True)
    t.start()
    inbox.start()
    sender = threading.Thread(target=lambda: (inbox.send(big), inbox.send(big.replace(b"p", b"q"))), daemon=True)
    sender.start()
    sender.join(60)
    assert not sender.is_alive(), "the send waited for the engine process to read"
    go.set()  # only now does the engine read what was sent
    t.join(60)
    assert not t.is_alive(), "the server and the engine waited for each other"
    assert bytes(got) == big + big.replace(b"p", b"q")  # whole and in order
    theirs.close()
    assert ended.wait(10)
    assert seen == list(range(20_000))


def test_sampling_params_cross_to_the_engine_process_with_every_field():
    """`SamplingParams` pickles as its fields in order (`__reduce__`, for the hand-off's cost): every field set
    away from its default, a watermark processor among them, comes back equal and in its own field."""
    import dataclasses
    import pickle

    from codemoat.engines.base import SamplingParams
    from codemoat.trace.watermark import WatermarkProcessor

    wm = WatermarkProcessor(b"k" * 32, vocab_size=100)
    p = SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.5, top_k=3, repeat_penalty=1.2, stop=["\n\n", "}"], seed=9,
        logits_processors=[wm], watermark=b"w", time_limit_ms=250.0, n_indent=4, adapter="a", cache_key="u",
        queue_deadline=12.5,
    )  # fmt: skip
    defaults = SamplingParams()
    for f in dataclasses.fields(SamplingParams):
        assert getattr(p, f.name) != getattr(defaults, f.name), f.name  # each field tells if it were lost or moved
    q = pickle.loads(pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL))
    for f in dataclasses.fields(SamplingParams):
        if f.name != "logits_processors":
            assert getattr(q, f.name) == getattr(p, f.name), f.name
    (wq,) = q.logits_processors
    assert isinstance(wq, WatermarkProcessor) and wq._key == wm._key and wq.vocab_size == 100


def test_warm_goes_only_to_an_idle_engine_process_whose_loop_reads(tiny_gguf):
    """`SupervisedEngine.warm` sends ("warm",) to a batching engine process with nothing under way; not while it
    generates (its loop is awake), not to a one-at-a-time engine process (its main thread reads, nothing polls).
    A request after a warning is answered as one without."""
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.llamacpp import LlamaCppEngine
    from codemoat.engines.supervised import SupervisedEngine

    spec = {"model_id": "tiny", "n_ctx": 512, "n_threads": 1}
    batched = SupervisedEngine.start(LlamaCppEngine, tiny_gguf, {**spec, "parallel": 2})
    single = SupervisedEngine.start(LlamaCppEngine, tiny_gguf, {**spec, "parallel": 1})
    sent: list[tuple[str, str]] = []
    for name, e in (("batched", batched), ("single", single)):
        real = e._child.send
        e._child.send = lambda msg, _real=real, _name=name: (sent.append((_name, msg[0])), _real(msg))[1]
    p = SamplingParams(max_tokens=12, temperature=0)
    try:
        plain = asyncio.run(batched.complete("def add(a, b):\n", p)).text
        sent.clear()
        batched.warm()
        single.warm()
        assert sent == [("batched", "warm")]
        assert asyncio.run(batched.complete("def add(a, b):\n", p)).text == plain

        async def beside() -> list[tuple[str, str]]:
            seen: list[tuple[str, str]] = []
            async for _ in batched.stream("def add(a, b):\n", p):
                sent.clear()
                batched.warm()
                seen += sent
            return seen

        assert asyncio.run(beside()) == []
    finally:
        batched.close()
        single.close()
