"""Per-request CPU of `codemoat serve`: an older checkout ("before") next to the working tree ("after").

Both servers run the bundled model (llama.cpp engine) at once, each with its own home (database,
audit log, token); the scenarios run on one server at a time, alternating which goes first. Short
completions (4 tokens), so that what the server does around the engine shows: CPU seconds of the
server's process tree per request, and requests/s, at 8 and 32 concurrent clients, streamed and not.

    git archive <rev> | tar -x -C /tmp/h10/before
    flock /tmp/s6/bench.lock timeout 300 .venv/bin/python bench/serve_cpu.py --before /tmp/h10/before/src
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "codemoat-tiny.gguf"
PROMPT = "def fibonacci(n):\n    "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> tuple[int, float]:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[1]), (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")  # ppid, utime + stime


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds of the server's main process (HTTP, trust layer), and of its engine child processes."""
    own, children = _stat(pid)[1], 0.0
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != pid:
            try:
                ppid, t = _stat(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                children += t
    return own, children


class Server:
    def __init__(self, name: str, src: Path, threads: int):
        self.name = name
        self.home = Path(tempfile.mkdtemp())
        env = dict(
            os.environ,
            PYTHONPATH=str(src),
            CODEMOAT_HOME=str(self.home),
            CODEMOAT_MODEL__N_THREADS=str(threads),
        )
        py = sys.executable
        out = subprocess.check_output([py, "-m", "codemoat.cli.main", "tokens", "create", "--name", "bench", "--json"], env=env)
        self.headers = {"Authorization": f"Bearer {json.loads(out)['token']}"}
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [py, "-m", "codemoat.cli.main", "serve", "--model", str(MODEL), "--model-id", "m", "--port", str(port)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(3000):
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited: {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/v1/models", headers=self.headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"{name} did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.home, ignore_errors=True)


async def load(s: Server, clients: int, per_client: int, stream: bool) -> dict:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": stream}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=s.url, headers=s.headers, timeout=120, limits=limits) as c:

        async def worker() -> None:
            for _ in range(per_client):
                r = await c.post("/v1/completions", json=body)
                r.raise_for_status()
                if stream:
                    assert r.text.rstrip().endswith("[DONE]"), r.text[-200:]

        await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(2)))  # warm
        (m0, e0), t0 = cpu_seconds(s.proc.pid), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall, (m1, e1) = time.perf_counter() - t0, cpu_seconds(s.proc.pid)
    n = clients * per_client
    return {"req_s": n / wall, "cpu_ms": (m1 - m0) / n * 1000, "engine_ms": (e1 - e0) / n * 1000}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, required=True, help="src/ of the older checkout")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=640, help="requests per scenario and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, the servers' order alternating; medians reported")
    ap.add_argument("--before-rev", default="?", help="the commit the older checkout was archived from")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_cpu.md")
    args = ap.parse_args()
    load0 = Path("/proc/loadavg").read_text().strip()
    servers = [Server("before", args.before, args.threads), Server("after", ROOT / "src", args.threads)]
    rows = []
    try:
        for i, (clients, stream) in enumerate([(8, False), (32, False), (8, True), (32, True)]):
            runs: dict[str, list[dict]] = {"before": [], "after": []}
            for r in range(args.rounds):
                order = servers if (i + r) % 2 == 0 else servers[::-1]
                for s in order:
                    runs[s.name].append(asyncio.run(load(s, clients, args.requests // clients, stream)))
            res = {
                name: {k: statistics.median(x[k] for x in rs) for k in ("req_s", "cpu_ms", "engine_ms")}
                for name, rs in runs.items()
            }
            rows.append((clients, stream, res))
            print(f"{clients} clients stream={stream}: {runs}", flush=True)
    finally:
        for s in servers:
            s.stop()
    load1 = Path("/proc/loadavg").read_text().strip()
    lines = [
        "# codemoat serve: CPU per request, before vs after (bench/serve_cpu.py)",
        "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Command: "
        f"`.venv/bin/python bench/serve_cpu.py {' '.join(sys.argv[1:])}` (under the shared bench lock) "
        f"(before = `git archive` of {args.before_rev}; after = the working tree). Model: "
        f"models/codemoat-tiny.gguf, llama.cpp engine, {args.threads} thread(s), 4-token greedy completions, "
        f"{args.requests} requests per scenario and round, {args.rounds} rounds (medians), the servers' order "
        "alternating; keep-alive connections. CPU: the server's main process (HTTP, trust layer: 'server'), and its engine child process (model.isolation = process, the default).",
        f"Load average before: `{load0}`; after: `{load1}` (2 cores shared with other work: read the ratios).",
        "",
        "| clients | stream | server CPU ms/request before | after | after/before | engine CPU ms/request before | after "
        "| requests/s before | after | after/before |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for clients, stream, res in rows:
        b, a = res["before"], res["after"]
        lines.append(
            f"| {clients} | {'yes' if stream else 'no'} | {b['cpu_ms']:.1f} | {a['cpu_ms']:.1f} | "
            f"{a['cpu_ms'] / b['cpu_ms']:.2f} | {b['engine_ms']:.1f} | {a['engine_ms']:.1f} | {b['req_s']:.1f} | {a['req_s']:.1f} | {a['req_s'] / b['req_s']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
