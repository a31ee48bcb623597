"""Issue 15's serve ratios, before and after, in one run: codemoat's code as it was at an older commit
(default 3120d99, whose bench/results/serve.md gave p50 0.643x and throughput 2.152x against
llama_cpp.server) next to codemoat at this checkout (batched, and model.parallel = 1) and
llama-cpp-python's `llama_cpp.server`, on one GGUF, with that run's scenario:

  per round and server: 20 sequential greedy 32-token completions of PROMPT (p50 / p95 latency), 10
  streamed ones (time to first token), then 8 concurrent clients x 4 requests of the same prompt
  (requests/s); keep-alive connections. Each round starts at the next server in turn (a rotation: no server
  runs two blocks in a row), and each server's block begins with WARM untimed requests.

The A/A bias (`--aa`: 'before' is a copy of this checkout's src/, the same code; an A/A run read this
checkout at 0.57-0.82x the copy's throughput and 1.08-1.17x its CPU per request) was a setting, not the
code's location: the before-code was started without CODEMOAT_MODEL__PARALLEL, so a before-code that
batches ran the default 4 slots beside codemoat's --parallel (8). It now gets the same settings. The
rounds used to alternate the order (forward, reversed), which runs the first and the last server twice
back to back at each turn; they now rotate, and every block starts warm.

The older code is `git archive`d into a temporary folder and run from this venv with PYTHONPATH pointing at
its src/ (checked: `codemoat.__file__` must resolve there); its token is made by its own CLI in its own home.
The servers are started by bench/serve.py's `Servers`; the requests are its `one` and `client`.

    .venv/bin/python bench/serve_before.py --threads 2 --out /tmp/serve-before.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import PROMPT, ROOT, Servers, client, cpu_seconds, one  # noqa: E402

REF = "llama_cpp.server"
WARM = 5  # untimed sequential requests before each server's block


def checkout(commit: str) -> Path:
    """`commit`'s tree in a new temporary folder (the working tree and branches are not touched)."""
    out = Path(tempfile.mkdtemp(prefix=f"codemoat-{commit}-"))
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", commit], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(out)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {commit} failed")
    return out


def copy_src() -> Path:
    """This checkout's src/ as it is now (uncommitted changes and all) in a new temporary folder: `--aa`'s
    'before', the same code as 'codemoat', so any difference between the two is the bench's own."""
    out = Path(tempfile.mkdtemp(prefix="codemoat-copy-"))
    shutil.copytree(ROOT / "src", out / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return out


def resolves_to(src: Path) -> str:
    """Where `import codemoat` goes with PYTHONPATH=src, from the directory the servers start in."""
    out = subprocess.check_output(
        [sys.executable, "-c", "import codemoat; print(codemoat.__file__)"], env=dict(os.environ, PYTHONPATH=str(src))
    ).decode()
    if not out.strip().startswith(str(src)):
        raise SystemExit(f"with PYTHONPATH={src}, codemoat is imported from {out.strip()}")
    return out.strip()


async def warm(url: str, headers: dict) -> None:
    """Untimed requests: the last block ran another server, whose memory now fills the CPU's caches."""
    async with client(url, headers, 1, keepalive=True) as c:
        for _ in range(WARM):
            await one(c, PROMPT, 32)


async def round_(url: str, headers: dict, requests: int) -> dict:
    """One round of the 2026-11-28 scenario on one server."""
    async with client(url, headers, 1, keepalive=True) as c:
        lat, toks = [], []
        for _ in range(requests):
            dt, _, n = await one(c, PROMPT, 32)
            lat.append(dt)
            toks.append(n)
        ttft = [(await one(c, PROMPT, 32, stream=True))[1] for _ in range(max(3, requests // 2))]
    async with client(url, headers, 8, keepalive=True) as c:

        async def worker() -> None:
            for _ in range(4):
                await one(c, PROMPT, 32)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(8)))
        rps = 32 / (time.perf_counter() - t0)
    return {"lat": lat, "ttft": ttft, "toks": toks, "rps": [rps]}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def summary(r: dict) -> dict:
    return {
        "p50": statistics.median(r["lat"]),
        "p95": pct(r["lat"], 95),
        "rps": statistics.median(r["rps"]),
        "ttft": statistics.median(r["ttft"]),
        "toks": statistics.mean(r["toks"]),
        "cpu": sum(r["cpu"]) / (len(r["lat"]) + len(r["ttft"]) + 32 * len(r["rps"])),
    }


def table(res: dict[str, dict], before: str) -> str:
    s = {name: summary(r) for name, r in res.items()}
    lines = [
        "| server | p50 latency (ms) | p95 latency (ms) | requests/s (8 clients) | streaming TTFT p50 (ms) | mean tokens/answer "
        "| server CPU per request (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in s.items():
        lines.append(
            f"| {name} | {v['p50'] * 1000:.1f} | {v['p95'] * 1000:.1f} | {v['rps']:.2f} | {v['ttft'] * 1000:.1f} | {v['toks']:.1f} "
            f"| {v['cpu'] * 1000:.1f} |"
        )
    keys = ("p50", "p95", "rps", "ttft", "cpu")
    for ref in (before, REF):  # each server against the before-code, then against llama_cpp.server
        if ref not in s:
            continue
        lines += [
            "",
            f"| ratio vs {ref} | p50 latency | p95 latency | throughput | time to first token | CPU per request |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for n, v in s.items():
            if n != ref:
                lines.append(f"| {n} | " + " | ".join(f"{v[k] / s[ref][k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commit", default="3120d99", help="the 'before' code (git archive of this commit)")
    ap.add_argument("--model", default=str(ROOT / "models" / "codemoat-tiny.gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=8, help="slots of today's batched codemoat")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=20, help="sequential requests per round for latency")
    ap.add_argument("--out", help="also write the markdown section here")
    ap.add_argument("--aa", action="store_true", help="A/A: 'before' is a copy of this checkout's src/, not --commit")
    ap.add_argument(
        "--servers", default="before,codemoat,codemoat-1,codemoat-inline," + REF, help="which to run ('before': the old code)"
    )
    args = ap.parse_args()
    before = "codemoat@copy" if args.aa else f"codemoat@{args.commit}"
    tree = copy_src() if args.aa else checkout(args.commit)
    try:
        where = resolves_to(tree / "src")
        args.servers = [before if n == "before" else n for n in args.servers.split(",")]
        load0, t0 = open("/proc/loadavg").read().split()[:3], time.time()
        servers = Servers(
            Path(args.model),
            args,
            "bench-" + os.urandom(12).hex(),
            dict(os.environ),
            {
                # the before-code gets codemoat's settings: --aa's copy ran with the default 4 slots beside
                # codemoat's 8 until 2026-12-04 (3120d99 has no model.parallel: it ignores the variable)
                before: {"PYTHONPATH": str(tree / "src"), "CODEMOAT_MODEL__PARALLEL": str(args.parallel)},
                "codemoat-inline": {"CODEMOAT_MODEL__ISOLATION": "inline", "CODEMOAT_MODEL__PARALLEL": str(args.parallel)},
            },
        )
        res: dict[str, dict] = {s: {"lat": [], "ttft": [], "toks": [], "rps": [], "cpu": []} for s in servers.urls}
        try:
            for s, u in servers.urls.items():  # warm-up
                asyncio.run(round_(u, servers.headers[s], 3))
            for r in range(args.rounds):
                names = list(servers.urls)
                order = names[r % len(names) :] + names[: r % len(names)]  # each server starts a round in turn
                for s in order:
                    asyncio.run(warm(servers.urls[s], servers.headers[s]))
                    cpu0 = cpu_seconds(servers.procs[s].pid)
                    got = asyncio.run(round_(servers.urls[s], servers.headers[s], args.requests))
                    got["cpu"] = [cpu_seconds(servers.procs[s].pid) - cpu0]
                    for k, v in got.items():
                        res[s][k] += v
                    print(
                        f"round {r + 1} {s:17s} p50 {statistics.median(got['lat']) * 1000:7.1f} ms  rps {got['rps'][0]:6.2f}",
                        flush=True,
                    )
        except httpx.HTTPError as e:
            raise SystemExit(f"{type(e).__name__}: {e}") from None
        finally:
            servers.stop()
        load1 = open("/proc/loadavg").read().split()[:3]
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    model = Path(args.model)
    origin = "a copy of this checkout's src/ (A/A: the same code)" if args.aa else f"`git archive {args.commit}`"
    md = f"""Measured by `.venv/bin/python bench/serve_before.py {" ".join(sys.argv[1:])}` on
{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0))}, {time.time() - t0:.0f} s, {os.cpu_count()} CPU cores shared with other work, load average
(1/5/15 min) {" ".join(load0)} before, {" ".join(load1)} after. Model `{model.name}` ({model.stat().st_size / 1e6:.1f} MB) for every
server, n_ctx {args.n_ctx}, {args.threads} threads each; {before}: {origin}, run from this venv
(codemoat imported from `{Path(where).parent.parent.parent.name}/src/codemoat`), its token made by its own CLI;
codemoat: this checkout, model.parallel = {args.parallel} (engine in a child process, the default);
codemoat-1: model.parallel = 1; codemoat-inline: model.isolation = inline (the engine in the server's process, as
{args.commit} ran it; model.parallel = {args.parallel}). Greedy 32-token completions of a
{len(PROMPT)}-character prompt; {args.rounds} rounds × {args.requests} sequential requests (p50/p95), {max(3, args.requests // 2)}
streamed (TTFT), 8 concurrent clients × 4 requests (requests/s); each round starts at the next server in turn,
each server's block after {WARM} untimed requests. Server
CPU per request: user + system time of the server's process tree (/proc) over its rounds, per request.

{table(res, before)}
"""
    if args.out:
        Path(args.out).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
