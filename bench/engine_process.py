"""What the engine process costs: the llama.cpp engine inline vs in a supervised child process, one run.

Two measurements, the two modes interleaved request by request so that noise from other work on the
machine hits both alike:
- engine level (no HTTP): p50 of a greedy 32-token `stream()`, `LlamaCppEngine` in this process vs
  `SupervisedEngine` (tokenising here, generation over a Unix socket);
- through `codemoat serve`: two servers on the same GGUF, `model.isolation = "inline"` and
  `"process"`: p50/p95 latency of a 32-token completion, requests/s with 4 concurrent clients,
  streaming time to first token.
Results go to bench/results/engine_process.md (target: process / inline ≤ 1.05 for p50 and throughput).
Usage: .venv/bin/python bench/engine_process.py [--model PATH] [--rounds N] [--requests N] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 'import os\nimport sys\n\n\ndef walk_python_files(root):\n    """Yield every .py file under root."""\n    for dirpath, dirnames, filenames in os.walk(root):\n'
MODES = ("inline", "process")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


# -- engine level -------------------------------------------------------------------
def cpu_seconds(e) -> tuple[float, float]:
    """CPU time (user + system) of this process, and of the engine process for a supervised engine (else 0)."""
    import psutil

    t = psutil.Process().cpu_times()
    child = getattr(e, "_child", None)
    c = psutil.Process(child.proc.pid).cpu_times() if child is not None else None
    return t.user + t.system, (c.user + c.system) if c is not None else 0.0


def engine_level(model: Path, threads: int, rounds: int, n: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall seconds per request per mode; CPU seconds per request (less sensitive to a busy machine) for
    inline, and for the server's side ("server") and the engine process ("engine") of the supervised one."""
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.llamacpp import LlamaCppEngine
    from codemoat.engines.supervised import SupervisedEngine

    opts = {"model_id": "m", "n_ctx": 2048, "n_threads": threads, "n_gpu_layers": 0}
    engines = {"inline": LlamaCppEngine.from_path(model, **opts), "process": SupervisedEngine.start(LlamaCppEngine, model, opts)}
    params = SamplingParams(max_tokens=32, temperature=0)

    async def one(e) -> float:
        t0 = time.perf_counter()
        k = 0
        async for c in e.stream(PROMPT, params):
            k += len(c.token_ids)
        assert k == 32, k
        return time.perf_counter() - t0

    async def run(e, count: int) -> list[float]:
        return [await one(e) for _ in range(count)]

    async def interleaved(count: int) -> dict[str, list[float]]:
        got: dict[str, list[float]] = {m: [] for m in MODES}
        for i in range(count):
            for m in MODES if i % 2 == 0 else MODES[::-1]:
                got[m].append(await one(engines[m]))
        return got

    out: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {"inline": [], "server": [], "engine": []}
    try:
        for e in engines.values():
            asyncio.run(run(e, 3))  # warm-up
        for _ in range(rounds):
            for m, xs in asyncio.run(interleaved(n)).items():  # wall time: requests interleaved one by one
                out[m] += xs
            for mode in MODES:  # CPU time: a block of requests per mode (ticks are 10 ms)
                s0, e0 = cpu_seconds(engines[mode])
                asyncio.run(run(engines[mode], n))
                s1, e1 = cpu_seconds(engines[mode])
                if mode == "inline":
                    cpu["inline"].append((s1 - s0) / n)
                else:
                    cpu["server"].append((s1 - s0) / n)
                    cpu["engine"].append((e1 - e0) / n)
    finally:
        for e in engines.values():
            e.close()
    return out, cpu


# -- through serve -------------------------------------------------------------------
def body(stream: bool = False) -> dict:
    return {"model": "m", "prompt": PROMPT, "max_tokens": 32, "temperature": 0, "stream": stream}


async def request(c: httpx.AsyncClient, stream: bool = False) -> tuple[float, int]:
    """(seconds to the whole answer, or to the first text when streaming; completion tokens)."""
    t0 = time.perf_counter()
    if not stream:
        r = await c.post("/v1/completions", json=body())
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]
    async with c.stream("POST", "/v1/completions", json=body(True)) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                return time.perf_counter() - t0, 0
    return time.perf_counter() - t0, 0


async def serve_round(urls: dict[str, str], headers: dict, n: int) -> dict[str, dict[str, list[float]]]:
    """One round, the two servers interleaved request by request (noise from other work hits both alike)."""
    out: dict[str, dict[str, list[float]]] = {m: {"lat": [], "ttft": [], "rps": []} for m in MODES}
    limits = httpx.Limits(max_connections=4)
    clients = {m: httpx.AsyncClient(base_url=urls[m], headers=headers, timeout=120, limits=limits) for m in MODES}
    try:
        for i in range(n):
            for m in MODES if i % 2 == 0 else MODES[::-1]:
                dt, k = await request(clients[m])
                assert k == 32, k
                out[m]["lat"].append(dt)
        for i in range(max(3, n // 2)):
            for m in MODES if i % 2 == 0 else MODES[::-1]:
                out[m]["ttft"].append((await request(clients[m], stream=True))[0])
        for m in MODES:

            async def worker(c: httpx.AsyncClient) -> None:
                for _ in range(4):
                    await request(c)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(clients[m]) for _ in range(4)))
            out[m]["rps"].append(16 / (time.perf_counter() - t0))
    finally:
        for c in clients.values():
            await c.aclose()
    return out


def through_serve(model: Path, threads: int, rounds: int, n: int) -> dict[str, dict[str, list[float]]]:
    home = Path(tempfile.mkdtemp())
    env = dict(os.environ, CODEMOAT_HOME=str(home), CODEMOAT_MODEL__N_THREADS=str(threads))
    py = sys.executable
    tok = json.loads(
        subprocess.check_output([py, "-m", "codemoat.cli.main", "tokens", "create", "--name", "bench", "--json"], env=env)
    )["token"]
    headers = {"Authorization": f"Bearer {tok}"}
    ports = {m: free_port() for m in MODES}
    procs = {
        m: subprocess.Popen(
            [
                py,
                "-m",
                "codemoat.cli.main",
                "serve",
                "--model",
                str(model),
                "--model-id",
                "m",
                "--port",
                str(ports[m]),
                "--n-ctx",
                "2048",
            ],
            env=dict(env, CODEMOAT_MODEL__ISOLATION=m),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for m in MODES
    }
    urls = {m: f"http://127.0.0.1:{ports[m]}" for m in MODES}
    out: dict[str, dict[str, list[float]]] = {m: {"lat": [], "ttft": [], "rps": []} for m in MODES}
    try:
        for m, p in procs.items():
            for _ in range(1200):
                if p.poll() is not None:
                    raise SystemExit(f"{m} server exited: {p.returncode}")
                try:
                    if httpx.get(urls[m] + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        asyncio.run(serve_round(urls, headers, 3))  # warm-up
        for r in range(rounds):
            res = asyncio.run(serve_round(urls, headers, n))
            for m in MODES:
                for k, v in res[m].items():
                    out[m][k] += v
            print(
                f"round {r + 1} p50 inline {statistics.median(res['inline']['lat']) * 1000:7.1f} ms, "
                f"process {statistics.median(res['process']['lat']) * 1000:7.1f} ms",
                flush=True,
            )
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(timeout=30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "codemoat-tiny.gguf"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=20, help="sequential requests per round and mode")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    model = Path(args.model)
    load_before = os.getloadavg()[0]
    eng, cpu = engine_level(model, args.threads, args.rounds, args.requests)
    srv = through_serve(model, args.threads, args.rounds, args.requests)
    load_after = os.getloadavg()[0]

    ms = lambda xs: statistics.median(xs) * 1000
    e_ratio = statistics.median(eng["process"]) / statistics.median(eng["inline"])
    cpu_ratio = (statistics.median(cpu["server"]) + statistics.median(cpu["engine"])) / statistics.median(cpu["inline"])
    p50_ratio = statistics.median(srv["process"]["lat"]) / statistics.median(srv["inline"]["lat"])
    p95_ratio = pct(srv["process"]["lat"], 95) / pct(srv["inline"]["lat"], 95)
    rps_ratio = statistics.median(srv["inline"]["rps"]) / statistics.median(srv["process"]["rps"])
    ttft_ratio = statistics.median(srv["process"]["ttft"]) / statistics.median(srv["inline"]["ttft"])
    ok = lambda c: "met" if c else "MISSED"
    rows = "\n".join(
        f"| {m} | {ms(srv[m]['lat']):.1f} | {min(srv[m]['lat']) * 1000:.1f} | {pct(srv[m]['lat'], 95) * 1000:.1f} "
        f"| {statistics.median(srv[m]['rps']):.2f} | {statistics.median(srv[m]['rps']) * 32:.0f} | {ms(srv[m]['ttft']):.1f} "
        f"| {ms(eng[m]):.2f} | {min(eng[m]) * 1000:.2f} |"
        for m in MODES
    )
    cpu_rows = (
        f"| inline | {ms(cpu['inline']):.2f} | — |\n"
        f"| process | {ms(cpu['engine']):.2f} (engine process) + {ms(cpu['server']):.2f} (server: tokenising, messages) "
        f"| {ms(cpu['server']):.2f} |"
    )
    cmd = "bench/engine_process.py" + "".join(f" --{k} {v}" for k, v in vars(args).items() if k != "model")
    md = f"""# The engine process: llama.cpp inline vs in a supervised child process

Measured by `.venv/bin/python {cmd}` on {time.strftime("%Y-%m-%d")} ({os.cpu_count()} CPU cores, a machine
shared with other work: load average {load_before:.1f} before, {load_after:.1f} after), one run, the two modes
interleaved request by request. Model: `{model.name}` ({model.stat().st_size / 1e6:.1f} MB), n_ctx 2048, {args.threads} thread(s),
greedy 32-token completions (every answer checked to be 32 tokens); {args.rounds} rounds × {args.requests}
sequential requests per mode for latency, 4 clients × 4 requests for throughput.

| isolation | p50 latency through serve (ms) | best (ms) | p95 (ms) | requests/s (4 clients) | tokens/s | streaming TTFT p50 (ms) | engine-level p50, no HTTP (ms) | engine-level best (ms) |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

Engine level, CPU time per 32-token request (median of rounds; CPU time is less disturbed by other work
on the machine than wall time):

| isolation | CPU per request (ms) | of which on the server's side of the boundary (ms) |
| --- | --- | --- |
{cpu_rows}

| ratio (process / inline) | value | target | |
| --- | --- | --- | --- |
| p50 latency through serve | {p50_ratio:.3f} | ≤ 1.05 | {ok(p50_ratio <= 1.05)} |
| throughput (inline rps / process rps) | {rps_ratio:.3f} | ≤ 1.05 | {ok(rps_ratio <= 1.05)} |
| best latency through serve (least disturbed by other work) | {min(srv["process"]["lat"]) / min(srv["inline"]["lat"]):.3f} | — | |
| p95 latency through serve | {p95_ratio:.3f} | — | |
| streaming time to first token | {ttft_ratio:.3f} | — | |
| engine level p50 (no HTTP) | {e_ratio:.3f} | — | |
| engine level best (no HTTP) | {min(eng["process"]) / min(eng["inline"]):.3f} | — | |
| engine level CPU per request (server + engine process) / inline | {cpu_ratio:.3f} | — | |

What crosses the boundary per request: the prompt's token ids and sampling parameters one way, one
pickled message per decoding step back (length-prefixed, on a Unix socket, read by the request's event
loop itself: `engines.inbox`), and a cancel when the client leaves. Tokenising and prompt building stay
in the server (a vocab-only llama over the same file or memfd).
"""
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "engine_process.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
