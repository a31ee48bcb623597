"""The inline engine's watchdog: `model.isolation = inline` runs llama.cpp on a worker thread of the server's
own process, which cannot be killed. Before, a worker that spun or hung held its request and every one after
it until their clients gave up, while /health answered 200 (docs/operations.md, commit fa0ac97). Now the
watchdogs of the engine process watch that thread (`engines.watchdog.InlineWatch`): a stall is a 503 for
the requests it owes and for new ones, /health 503 with its reason, an audited `engine_crashed` incident, and
(`model.exit_on_hang`, the default) the server stops and exits with status 70 for its service manager.

Served with the test engine `crash_engine.CrashingEngine` (its markers spin, block or slow the worker); the
negatives: a long prefill that steps, and a long silent one that works, are not stalls.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import httpx

from conftest import create_token, run_cli
from enginehelp import greedy, run

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
ENGINE = "crash_engine:CrashingEngine"
INLINE = {
    "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    "CODEMOAT_MODEL__ISOLATION": "inline",
    "CODEMOAT_MODEL__SPIN_TIMEOUT_S": "3",
}
# greedy: at OpenAI's default temperature 1 the first token can end the answer
SERVED = {"prompt": "def add(a, b):\n", "max_tokens": 4, "temperature": 0}


def engine_crashed() -> list[dict]:
    r = run_cli("audit", "export", "--kind", "engine_crashed")
    assert r.returncode == 0, r.stderr
    out = []
    for line in r.stdout.splitlines():
        if line.strip():
            record = json.loads(line)
            d = record["detail"]
            out.append({**record, "detail": json.loads(d) if isinstance(d, str) else d})
    return out


def refused_requests() -> list[dict]:
    r = run_cli("audit", "export", "--kind", "request")
    assert r.returncode == 0, r.stderr
    return [x for x in map(json.loads, r.stdout.splitlines()) if x["status"] == 503]


def wait_for(what, seconds: float = 120, step: float = 0.1):
    """`what()` once it is truthy; fails after `seconds` (generous: 2 cores, a whole suite beside)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got = what()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"not so after {seconds} s")


def inline_engine(tiny_gguf, **kw):
    """A `CrashingEngine` in this process (n_ctx 256, one thread), and the list its incidents go to."""
    from crash_engine import CrashingEngine

    eng = CrashingEngine.from_path(tiny_gguf, model_id="tiny", n_ctx=kw.pop("n_ctx", 256), n_threads=1, **kw)
    incidents: list = []
    eng.on_incident = lambda kind, detail: incidents.append((kind, detail))
    return eng, incidents


def test_an_inline_engine_that_spins_is_a_503_audited_and_stops_the_server(serve_process, tiny_gguf):
    """`model.spin_timeout_s` inline, through a real `codemoat serve` (batching: parallel 4): the worker spins for
    good, busy, making no step. The request gets 503 in OpenAI's shape with Retry-After, the incident and the
    request are audited, and the server stops by itself with status 70 (`model.exit_on_hang` is on by default),
    where before it answered /health 200 with the request waiting until its client gave up."""
    token = create_token("--name", "spin")
    srv = serve_process(["--model", str(tiny_gguf), "--engine", ENGINE, "--n-ctx", "512"], env=INLINE)
    # 3 s on a core can take a minute of wall time for a starved server (nice 19 beside a benchmark)
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as c:
        h = c.get("/health").json()
        assert h["engine"]["slots"]["total"] == 4 and h["engine"]["watchdog"]["exit_on_hang"] is True, h
        model = h["model"]
        r = c.post("/v1/completions", json={"model": model, "prompt": "<<spin>>def f(", "max_tokens": 4})
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
        err = r.json()["error"]
        assert "stopped answering" in err["message"] and err["code"] == "model_unavailable", err
    assert srv.proc.wait(timeout=120) == 70, srv.output()
    out = srv.output()
    assert "made no step" in out and "stopping the server (exit status 70)" in out, out
    (record,) = engine_crashed()
    d = record["detail"]
    assert record["model"] == model and d["hung"] is True and d["isolation"] == "inline" and d["exit_status"] == 70, d
    assert "the inline engine sent nothing and made no step" in d["why"], d
    assert refused_requests()  # the 503 was answered and audited before the server stopped


def test_an_inline_stall_without_exit_is_a_503_until_the_worker_works_again(serve_process, tiny_gguf, tmp_path):
    """`model.exit_on_hang = false`: the server stays up while its worker spins. /health is 503 with the stall's
    reason (to a caller with a token; a bare liveness check gets 503 too), new requests get 503 at once in
    each protocol's shape with Retry-After, /livez stays 200, the incident is audited. When the worker comes
    back (the test releases its spin), /health is 200 again and requests are answered."""
    release = tmp_path / "release"
    env = {**INLINE, "CODEMOAT_MODEL__EXIT_ON_HANG": "false", "CODEMOAT_TEST_RELEASE": str(release)}
    token = create_token("--name", "stall")
    srv = serve_process(["--model", str(tiny_gguf), "--engine", ENGINE, "--n-ctx", "512"], env=env)
    try:
        # 300 s: the spinning worker holds the GIL in the server's own process (that is the stall), and the first
        # 503 took 33 s to over 120 s on this 2-core VM in session 19, on the tree before its changes too
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=300) as c:
            model = c.get("/health").json()["model"]
            r = c.post("/v1/completions", json={"model": model, "prompt": "<<spin-until-released>>def f(", "max_tokens": 4})
            assert r.status_code == 503 and "stopped answering" in r.json()["error"]["message"], r.text
            h = c.get("/health")
            assert h.status_code == 503, h.text
            body = h.json()
            assert body["state"] == "stalled" and "made no step" in body["reason"], body
            assert body["engine"]["stall"]["exit_status"] is None and body["engine"]["stalls"] == 1, body
            assert httpx.get(srv.url + "/health", timeout=60).status_code == 503  # what a load balancer sees
            assert httpx.get(srv.url + "/livez", timeout=60).status_code == 200  # the process is kept
            r = c.post("/v1/completions", json={**SERVED, "model": model})
            assert r.status_code == 503 and r.headers["Retry-After"] and r.json()["error"]["code"] == "model_unavailable", r.text
            r = c.post("/api/generate", json={"model": model, "prompt": "def f(", "stream": False})
            assert r.status_code == 503 and "stopped answering" in r.json()["error"], r.text
            (record,) = wait_for(engine_crashed)  # reported once the requests it owed had their 503
            assert record["detail"]["hung"] is True and record["detail"]["exit_status"] is None, record
            assert srv.proc.poll() is None
            release.touch()
            wait_for(lambda: c.get("/health").status_code == 200)
            r = c.post("/v1/completions", json={**SERVED, "model": model})
            assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
            assert c.get("/health").json()["engine"]["stall"] is None
        assert srv.stop() == 0, srv.output()  # a stall that cleared stops the server as usual: exit 0
    finally:
        release.touch()  # the spinning worker lets the server stop


def test_an_inline_worker_that_waits_without_working_is_a_stall_and_recovers(tiny_gguf):
    """`model.answer_timeout_s` inline: the worker waits, asleep, while a request is owed its answer (no step,
    no answer, no time on or waiting for a core). The request gets `Stalled` (a 503), so does the next one at
    once, the state is "stalled" and one incident says why; once the worker takes a job again the stall
    clears and the same request is answered."""
    from codemoat.engines.watchdog import Stalled
    from crash_engine import BLOCK, RELEASE

    RELEASE.clear()
    eng, incidents = inline_engine(tiny_gguf, parallel=2)
    try:
        eng.watch(2.0, 0.0, exit_on_hang=False)

        async def ask(prompt: str) -> str:
            return (await eng.complete(prompt, greedy(max_tokens=4))).text

        try:
            run(ask(BLOCK + "def f("))
            raise AssertionError("answered")
        except Stalled as e:
            assert "stopped answering" in str(e) and e.status == 503 and e.retry_after >= 1
        assert eng.state == "stalled" and "did no work" in eng.stalled
        try:
            run(ask("def add(a, b):\n"))
            raise AssertionError("answered")
        except Stalled:
            pass
        wait_for(lambda: incidents)  # reported once the requests it owed had their 503
        assert [(k, d["hung"], d["isolation"], d["exit_status"]) for k, d in incidents] == [
            ("engine_crashed", True, "inline", None)
        ]
        assert "the inline engine sent nothing for" in incidents[0][1]["why"]
        RELEASE.set()
        wait_for(lambda: eng.state == "ready")
        assert run(ask("def add(a, b):\n"))
        assert len(incidents) == 1 and eng.health()["stalls"] == 1
    finally:
        RELEASE.set()
        eng.close()


def test_an_inline_long_prefill_that_steps_is_progress_not_a_stall(tiny_gguf):
    """What the inline spin watchdog counts as progress: a long prompt's prefill sends nothing until its first
    token, but the worker makes a step every `STEP_S` on a core. With `spin_timeout_s` well under the silence,
    the answer comes in full and nothing is reported (a watchdog of a busy, silent thread alone cuts it)."""
    from crash_engine import SLOW_STEPS, STEP_S

    eng, incidents = inline_engine(tiny_gguf, n_ctx=1024, parallel=2, batch_tokens=32)
    try:
        eng.watch(0.0, 2 * STEP_S + 0.5, exit_on_hang=False)
        prompt = SLOW_STEPS + "x = 1\n" * 60  # about ten prompt steps before the first token

        async def first_token_after() -> tuple[float, int]:
            start, first, n = time.monotonic(), None, 0
            async for chunk in eng.stream(prompt, greedy(max_tokens=3)):
                first = first if first is not None else time.monotonic() - start
                n += len(chunk.token_ids)
            return first, n

        silent, n = run(first_token_after())
        assert silent > 2 * (2 * STEP_S + 0.5) and n == 3, (silent, n)  # silent past the limit (on a core, too), yet stepping
        assert incidents == [] and eng.state == "ready" and eng.health()["stalls"] == 0
    finally:
        eng.close()


def test_an_inline_long_silent_prefill_is_work_not_a_stall(tiny_gguf):
    """What the inline answer watchdog counts as progress (one request at a time, no steps): the worker computes
    for `SILENT_WORK_S` before its first token, sending nothing, with `answer_timeout_s` a sixth of that; the
    answer comes in full and nothing is reported (a watchdog of silence alone cuts it)."""
    from crash_engine import SILENT_WORK, SILENT_WORK_S

    eng, incidents = inline_engine(tiny_gguf)
    try:
        eng.watch(SILENT_WORK_S / 6, 0.0, exit_on_hang=False)
        out = run(eng.complete(SILENT_WORK + "def add(a, b):\n", greedy(max_tokens=4)))
        assert out.completion_tokens == 4
        assert incidents == [] and eng.state == "ready"
    finally:
        eng.close()


def test_the_watchdog_watches_the_worker_thread_alone(tiny_gguf):
    """Inline, the server's other threads keep working while the engine is stuck: the watchdog reads its worker
    thread's schedstat, not the process's, so a busy thread beside a blocked worker does not pass for its work."""
    from crash_engine import BLOCK, RELEASE

    RELEASE.clear()
    eng, incidents = inline_engine(tiny_gguf)
    busy = threading.Event()

    def beside() -> None:
        while not busy.is_set():
            sum(range(10_000))

    t = threading.Thread(target=beside, daemon=True)
    t.start()
    try:
        eng.watch(2.0, 0.0, exit_on_hang=False)
        try:
            run(eng.complete(BLOCK + "def f(", greedy(max_tokens=4)))
            raise AssertionError("answered")
        except Exception as e:
            assert type(e).__name__ == "Stalled", e
        assert [k for k, _ in wait_for(lambda: incidents)] == ["engine_crashed"]
    finally:
        busy.set()
        RELEASE.set()
        t.join(timeout=60)
        wait_for(lambda: eng.state == "ready")  # the worker is back: close() frees the model (a stalled one's it leaves)
        eng.close()
