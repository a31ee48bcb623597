"""Serving overhead: codemoat vs llama-cpp-python's own OpenAI server, side by side in one run.

Both serve the same GGUF with the same context and thread count; rounds alternate between the two
servers so machine noise hits both alike. Reported: p50/p95 latency of a 32-token completion,
requests/s with 8 concurrent clients, and time to first token when streaming. Results go to
bench/results/serve.md. Usage: .venv/bin/python bench/serve.py [--model PATH] [--rounds N]
`--model gemma` serves the pretrained Gemma 3 270M Q4_K_M (bench/gemma.py) into bench/results/serve-gemma.md.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, proc: subprocess.Popen, headers: dict) -> None:
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("server did not start")


def body(stream: bool = False) -> dict:
    # greedy, fixed length: both servers do the same work (ignore_eos is not in the OpenAI API,
    # so a stop-free prompt and max_tokens=32 keep lengths equal; lengths are checked below)
    return {"model": "m", "prompt": PROMPT, "max_tokens": 32, "temperature": 0, "stream": stream}


async def one(client: httpx.AsyncClient, stream: bool = False) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    ttft = 0.0
    if not stream:
        r = await client.post("/v1/completions", json=body())
        r.raise_for_status()
        n = r.json()["usage"]["completion_tokens"]
        return time.perf_counter() - t0, 0.0, n
    n = 0
    async with client.stream("POST", "/v1/completions", json=body(True)) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                if not ttft and json.loads(line[6:])["choices"][0]["text"]:
                    ttft = time.perf_counter() - t0
                n += 1
    return time.perf_counter() - t0, ttft, n


async def latency(url: str, headers: dict, n: int) -> tuple[list[float], list[float], list[int]]:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as c:
        lat, toks = [], []
        for _ in range(n):
            dt, _, k = await one(c)
            lat.append(dt)
            toks.append(k)
        ttft = [(await one(c, stream=True))[1] for _ in range(max(3, n // 2))]
    return lat, ttft, toks


async def throughput(url: str, headers: dict, clients: int, per_client: int) -> float:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=httpx.Limits(max_connections=clients)) as c:

        async def worker():
            for _ in range(per_client):
                await one(c)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return clients * per_client / (time.perf_counter() - t0)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "codemoat-tiny.gguf"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=20, help="sequential requests per round for latency")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = Path(args.model)
    if args.model == "gemma":  # the pretrained Gemma 3 270M Q4_K_M, installed into the bench's scratch venv
        sys.path.insert(0, str(ROOT / "bench"))
        from gemma import gemma_path

        model = gemma_path()
    home = Path(tempfile.mkdtemp())
    env = dict(os.environ, CODEMOAT_HOME=str(home))
    py = sys.executable
    tok = json.loads(
        subprocess.check_output([py, "-m", "codemoat.cli.main", "tokens", "create", "--name", "bench", "--json"], env=env)
    )["token"]
    cm_port, ref_port = free_port(), free_port()
    procs = {
        "codemoat": subprocess.Popen(
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
                str(cm_port),
                "--n-ctx",
                "2048",
            ],
            env=dict(env, CODEMOAT_MODEL__N_THREADS=str(args.threads), CODEMOAT_MODEL__MAX_TOKENS_LIMIT="1024"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        "llama_cpp.server": subprocess.Popen(
            [
                py,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model),
                "--model_alias",
                "m",
                "--port",
                str(ref_port),
                "--n_ctx",
                "2048",
                "--n_threads",
                str(args.threads),
                "--api_key",
                tok,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    }
    urls = {"codemoat": f"http://127.0.0.1:{cm_port}", "llama_cpp.server": f"http://127.0.0.1:{ref_port}"}
    headers = {"Authorization": f"Bearer {tok}"}
    res: dict[str, dict[str, list]] = {k: {"lat": [], "ttft": [], "rps": [], "toks": []} for k in procs}
    try:
        for name, p in procs.items():
            wait(urls[name], p, headers)
        for name in procs:  # warm-up
            asyncio.run(latency(urls[name], headers, 3))
        for r in range(args.rounds):
            order = list(procs) if r % 2 == 0 else list(reversed(procs))
            for name in order:
                lat, ttft, toks = asyncio.run(latency(urls[name], headers, args.requests))
                rps = asyncio.run(throughput(urls[name], headers, 8, 4))
                res[name]["lat"] += lat
                res[name]["ttft"] += ttft
                res[name]["rps"].append(rps)
                res[name]["toks"] += toks
                print(f"round {r + 1} {name:17s} p50 {statistics.median(lat) * 1000:7.1f} ms  rps {rps:6.2f}", flush=True)
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(timeout=30)
    cm, ref = res["codemoat"], res["llama_cpp.server"]
    rows = []
    for name, r in res.items():
        rows.append(
            f"| {name} | {statistics.median(r['lat']) * 1000:.1f} | {pct(r['lat'], 95) * 1000:.1f} | {statistics.median(r['rps']):.2f} | {statistics.median(r['ttft']) * 1000:.1f} | {statistics.mean(r['toks']):.1f} |"
        )
    p50_ratio = statistics.median(cm["lat"]) / statistics.median(ref["lat"])
    p95_ratio = pct(cm["lat"], 95) / pct(ref["lat"], 95)
    rps_ratio = statistics.median(cm["rps"]) / statistics.median(ref["rps"])
    ttft_ratio = statistics.median(cm["ttft"]) / statistics.median(ref["ttft"])
    ok = lambda c: "met" if c else "MISSED"
    md = f"""# Serving overhead: codemoat vs llama-cpp-python's server

Measured by `bench/serve.py` on {time.strftime("%Y-%m-%d")} ({os.cpu_count()} CPU cores, shared machine), one run,
rounds alternating between the servers. Model: `{model.name}` ({model.stat().st_size / 1e6:.1f} MB), n_ctx 2048,
{args.threads} threads each, greedy 32-token completions of a {len(PROMPT)}-character prompt; throughput with 8 concurrent
clients × 4 requests; {args.rounds} rounds × {args.requests} sequential requests for latency.

| server | p50 latency (ms) | p95 latency (ms) | requests/s (8 clients) | streaming TTFT p50 (ms) | mean tokens/answer |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

| ratio (codemoat / reference) | value | target | |
| --- | --- | --- | --- |
| p50 latency | {p50_ratio:.3f} | ≤ 1.10 | {ok(p50_ratio <= 1.10)} |
| p95 latency | {p95_ratio:.3f} | — | |
| throughput | {rps_ratio:.3f} | ≥ 0.95 | {ok(rps_ratio >= 0.95)} |
| time to first token | {ttft_ratio:.3f} | — | |

codemoat's path includes bearer-token authentication against SQLite, the audit record of each request and
the protocol translation; the reference authenticates with a fixed API key and keeps no records.
"""
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    out = "serve.md"
    if args.model == "gemma":  # its own file beside serve.md, with the model's terms
        from gemma import TERMS

        md = md.replace("# Serving overhead:", "# Serving overhead on Gemma 3 270M Q4_K_M:", 1) + f"\n## Model terms\n\n{TERMS}\n"
        out = "serve-gemma.md"
    (ROOT / "bench" / "results" / out).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
