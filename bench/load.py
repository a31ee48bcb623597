"""Load: 64 concurrent clients for 60 s of mixed completions and chat through `codemoat serve`.

Checks what the trust layer promises under load: no 5xx, exactly one audit record per request,
`codemoat audit verify` passing afterwards, and memory that stays flat (peak RSS of the server
by 10 s and by the end). Side by side in the same run, the audit log alone is timed in-process
(appends/s and verifies/s on a scratch database) to show what share of the server's capacity
auditing takes.

    .venv/bin/python bench/load.py [--clients 64] [--seconds 60] [--model PATH]

Writes bench/results/load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _results import write_in_place  # bench/ is the script's folder: other sections of the file stay

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "load.md"
CODEMOAT = [sys.executable, "-m", "codemoat.cli.main"]

PROMPTS = [
    "def fibonacci(n):\n    ",
    "class Stack:\n    def __init__(self):\n        ",
    "import os\n\ndef list_files(path):\n    ",
    "for i in range(10):\n    ",
    "def add(a, b):\n    return",
    "async def fetch(url):\n    ",
]
QUESTIONS = [
    "What does def add(a, b) do?",
    "Explain a Python list comprehension.",
    "How do I reverse a string?",
    "What is a class?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_path(arg: str | None, scratch: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), "given"
    bundled = ROOT / "models" / "codemoat-tiny.gguf"
    if bundled.exists():
        return bundled, "bundled models/codemoat-tiny.gguf"
    sys.path.insert(0, str(ROOT / "tests"))
    from tinymodel import build_tiny_gguf

    p = build_tiny_gguf(scratch / "tiny.gguf")
    return p, "tests/tinymodel.py tiny GGUF (2 layers, hidden 64; the bundled model was not present)"


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CODEMOAT, *args], env=env, capture_output=True, text=True, timeout=300)


async def client_loop(i: int, url: str, token: str, model: str, deadline: float, out: list, rng: random.Random) -> None:
    # A long timeout: on a loaded machine a queued request can take minutes, and a client that gives
    # up turns a slow answer into a missing one.
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=900) as c:
        while time.monotonic() < deadline:
            r = rng.random()
            kind = "completion" if r < 0.5 else ("chat" if r < 0.75 else "chat_stream")
            t0 = time.perf_counter()
            status = 0
            try:
                if kind == "completion":
                    resp = await c.post(
                        "/v1/completions", json={"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(8, 32)}
                    )
                    status = resp.status_code
                elif kind == "chat":
                    resp = await c.post(
                        "/v1/chat/completions",
                        json={
                            "model": model,
                            "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
                            "max_tokens": rng.randint(8, 32),
                        },
                    )
                    status = resp.status_code
                else:
                    body = {
                        "model": model,
                        "stream": True,
                        "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
                        "max_tokens": rng.randint(8, 32),
                    }
                    async with c.stream("POST", "/v1/chat/completions", json=body) as resp:
                        status = resp.status_code
                        async for _ in resp.aiter_lines():
                            pass
            except httpx.HTTPError as e:
                status = f"error:{type(e).__name__}"
            out.append((kind, status, time.perf_counter() - t0))


def sample_rss(pid: int) -> int:
    try:
        p = psutil.Process(pid)
        return p.memory_info().rss + sum(ch.memory_info().rss for ch in p.children(recursive=True))
    except psutil.Error:
        return 0


async def drive(url: str, tokens: list[str], model: str, clients: int, seconds: float, pid: int) -> tuple[list, dict]:
    out: list = []
    rss: list[tuple[float, int]] = []
    start = time.monotonic()
    deadline = start + seconds

    async def sampler():
        while time.monotonic() < deadline + 1:
            rss.append((time.monotonic() - start, sample_rss(pid)))
            await asyncio.sleep(0.5)

    s = asyncio.create_task(sampler())
    await asyncio.gather(
        *(client_loop(i, url, tokens[i % len(tokens)], model, deadline, out, random.Random(i)) for i in range(clients))
    )
    elapsed = time.monotonic() - start
    await s
    mem = {
        "start": rss[0][1],
        "peak_10s": max(v for t, v in rss if t <= 10),
        "peak_end": max(v for _, v in rss),
        "at_10s": min(rss, key=lambda x: abs(x[0] - 10))[1],
        "at_end": rss[-1][1],
        "elapsed": elapsed,
    }
    return out, mem


def audit_alone(scratch: Path, n: int = 2000) -> dict:
    """Appends/s and verifies/s of the audit log on a scratch database, in this process."""
    os.environ["CODEMOAT_HOME"] = str(scratch / "micro-home")
    from codemoat import paths
    from codemoat.audit.log import AuditLog, head_file_for
    from codemoat.db import open_db

    url = f"sqlite:///{paths.home() / 'micro.db'}"
    log = AuditLog(open_db(url), head_file=head_file_for(url, paths.home()))
    t0 = time.perf_counter()
    for i in range(n):
        log.append(
            user="u",
            token_id="tok_1",
            route="/v1/completions",
            protocol="openai",
            model="m",
            repos=["r"],
            snippets=["s1", "s2"],
            prompt_tokens=100,
            completion_tokens=20,
            latency_ms=12.5,
            status=200,
            client="127.0.0.1",
        )
    append_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = log.verify()
    verify_s = time.perf_counter() - t0
    assert rep.ok
    return {"appends_per_s": n / append_s, "verify_records_per_s": n / verify_s, "n": n}


# The baseline arm only: `codemoat serve` with `trust.install` replaced by a no-op (never in production).
_NO_TRUST = (
    "import sys, codemoat.serve.trust as t; t.install = lambda app, settings: None; "
    "from codemoat.cli.main import main; sys.argv = ['codemoat', *sys.argv[1:]]; main()"
)


def start_server(model: Path, env: dict, scratch: Path, token: str, *, trust: bool):
    port = free_port()
    log_file = open(scratch / f"serve-{port}.log", "w")
    cmd = [*CODEMOAT] if trust else [sys.executable, "-c", _NO_TRUST]
    server = subprocess.Popen(
        [*cmd, "serve", "--model", str(model), "--port", str(port)], env=env, stdout=log_file, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            sys.exit(f"server exited: {(scratch / f'serve-{port}.log').read_text()[-2000:]}")
        time.sleep(0.2)
    try:
        model_id = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=120).json()["data"][0][
            "id"
        ]
    except Exception:
        stop_server(server)
        raise
    return server, url, model_id


METRICS_AUTH: dict[str, str] = {}  # a metrics-scope token's header: /metrics needs one


def in_flight(url: str) -> float:
    try:
        text = httpx.get(url + "/metrics", headers=METRICS_AUTH, timeout=10).text
    except httpx.HTTPError:
        return 0.0
    line = next((x for x in text.splitlines() if x.startswith("codemoat_requests_in_flight ")), None)
    return float(line.split()[1]) if line else 0.0


def stop_server(server, url: str | None = None) -> None:
    """Stop after the server has finished what it was given (at most 10 minutes)."""
    deadline = time.monotonic() + 600
    while url and time.monotonic() < deadline and in_flight(url) > 0:
        time.sleep(0.5)
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=120)


def wipe_audit(env: dict) -> None:
    """Start the main run from an empty audit log (tokens kept), so its records can be counted exactly."""
    import sqlite3

    home = Path(env["CODEMOAT_HOME"])
    con = sqlite3.connect(home / "codemoat.db")
    for t in ("audit_records", "audit_checkpoints", "audit_head"):
        con.execute(f"DELETE FROM {t}")
    con.execute("UPDATE audit_tip SET seq = 0, hash = ?", ("0" * 64,))  # the chain starts again at record 1
    con.commit()
    con.close()
    for p in home.glob("audit-head-*.json"):
        p.unlink()


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--model")
    ap.add_argument(
        "--compare-seconds", type=float, default=20, help="Length of each arm of the with/without-trust comparison (0: skip)."
    )
    ap.add_argument("--compare-clients", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="codemoat-load-"))
    home = scratch / "home"
    env = dict(os.environ, CODEMOAT_HOME=str(home))
    env.pop("CODEMOAT_DATABASE_URL", None)
    model, model_note = model_path(a.model, scratch)
    users = [f"dev{i}" for i in range(8)]
    tokens = []
    for u in users:
        r = cli(env, "tokens", "create", "--name", u, "--json")
        if r.returncode:
            sys.exit(f"tokens create failed: {r.stderr.strip()}")
        tokens.append(json.loads(r.stdout)["token"])
    r = cli(env, "tokens", "create", "--name", "scraper", "--scopes", "metrics", "--json")
    METRICS_AUTH["Authorization"] = f"Bearer {json.loads(r.stdout)['token']}"

    # Side by side first: the same server with and without the trust layer, alternating (A B A B)
    # so that the shared machine's changing load hits both alike.
    compare: dict[str, list[tuple[int, float, float]]] = {"trust": [], "none": []}
    if a.compare_seconds > 0:
        for arm in ("none", "trust", "none", "trust"):
            srv, url, model_id = start_server(model, env, scratch, tokens[0], trust=arm == "trust")
            try:
                res, m = asyncio.run(drive(url, tokens, model_id, a.compare_clients, a.compare_seconds, srv.pid))
            finally:
                stop_server(srv, url)
            ok = [t for _, st, t in res if st == 200]
            compare[arm].append((len(ok), m["elapsed"], statistics.median(ok) if ok else float("nan")))
        wipe_audit(env)

    server, url, model_id = start_server(model, env, scratch, tokens[0], trust=True)
    try:
        results, mem = asyncio.run(drive(url, tokens, model_id, a.clients, a.seconds, server.pid))
    finally:
        stop_server(server, url)

    # Every request the clients sent (plus the one /v1/models above) must have exactly one record.
    sys.path.insert(0, str(ROOT / "src"))
    os.environ["CODEMOAT_HOME"] = str(home)
    from codemoat import paths
    from codemoat.audit.log import AuditLog
    from codemoat.db import open_db

    log = AuditLog(open_db(paths.db_url()))
    recs = list(log.records(kind="request"))
    by_route = Counter(r["route"] for r in recs)
    rec_status = Counter(r["status"] for r in recs)
    verify = cli(env, "audit", "verify", "--json")
    vrep = json.loads(verify.stdout) if verify.stdout.strip().startswith("{") else {"ok": False, "problem": verify.stderr.strip()}

    micro = audit_alone(scratch)
    statuses = Counter(s for _, s, _ in results)
    sent = len(results)
    five = sum(n for s, n in statuses.items() if isinstance(s, int) and s >= 500)
    errors = sum(n for s, n in statuses.items() if not isinstance(s, int))
    rps = sent / mem["elapsed"]
    lat = {k: [t for kk, s, t in results if kk == k and s == 200] for k in ("completion", "chat", "chat_stream")}
    sent_by_route = Counter("/v1/completions" if k == "completion" else "/v1/chat/completions" for k, _, _ in results)
    one_each = (
        by_route.get("/v1/completions", 0) == sent_by_route["/v1/completions"]
        and by_route.get("/v1/chat/completions", 0) == sent_by_route["/v1/chat/completions"]
        and len(recs) == sent + 1
    )
    mb = 1 << 20
    lines = [
        "# Load: 64 clients through `codemoat serve`, with the trust layer on",
        "",
        f"`.venv/bin/python bench/load.py --clients {a.clients} --seconds {a.seconds:g}` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs (shared with other work), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Model: {model_note}. Mix: 50% `/v1/completions`, 25% `/v1/chat/completions`, 25% streamed chat; max_tokens 8–32; "
        "audit with `retain_text = false` (default), 8 users.",
        "",
        "| check | result |",
        "| --- | --- |",
        f"| requests sent in {mem['elapsed']:.1f} s | {sent} ({rps:.1f}/s) |",
        f"| client-side statuses | {dict(sorted((str(k), v) for k, v in statuses.items()))} |",
        f"| 5xx responses | **{five}** |",
        f"| transport errors (no response) | {errors} |",
        f"| audit records (kind request) | {len(recs)} = {sent} sent + 1 `/v1/models` → **{'exactly one per request' if one_each else 'MISMATCH'}** |",
        f"| records by route | {dict(by_route)} |",
        f"| record statuses | {dict(rec_status)} |",
        f"| `codemoat audit verify` afterwards | **{'OK' if vrep.get('ok') else 'FAILED: ' + str(vrep.get('problem'))}** ({vrep.get('records')} records, {vrep.get('checkpoints')} signed checkpoints) |",
        f"| server RSS at start / at 10 s / at end | {mem['start'] / mb:.0f} / {mem['at_10s'] / mb:.0f} / {mem['at_end'] / mb:.0f} MiB |",
        f"| server peak RSS by 10 s / by {a.seconds:g} s | {mem['peak_10s'] / mb:.0f} / {mem['peak_end'] / mb:.0f} MiB (ratio {mem['peak_end'] / mem['peak_10s']:.2f}) |",
        "",
        "Latency of successful requests (client-side, seconds):",
        "",
        "| kind | n | p50 | p95 | p99 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for k, xs in lat.items():
        lines.append(f"| {k} | {len(xs)} | {pct(xs, 0.5):.3f} | {pct(xs, 0.95):.3f} | {pct(xs, 0.99):.3f} |")
    if compare["trust"] and compare["none"]:

        def rate(arm):
            return sum(n for n, _, _ in compare[arm]) / sum(e for _, e, _ in compare[arm])

        def med(arm):
            return statistics.median(m for _, _, m in compare[arm])

        lines += [
            "",
            f"Side by side, same run: the same server with the trust layer and with `trust.install` replaced by a no-op "
            f"(bench only), {a.compare_clients} clients, {a.compare_seconds:g} s per arm, arms alternated none/trust/none/trust:",
            "",
            "| server | successful requests/s | median latency (s) |",
            "| --- | --- | --- |",
            f"| without trust layer | {rate('none'):.2f} | {med('none'):.3f} |",
            f"| with trust layer | {rate('trust'):.2f} | {med('trust'):.3f} |",
            f"| ratio (with / without) | **{rate('trust') / rate('none'):.2f}** | {med('trust') / med('none'):.2f} |",
        ]
    lines += [
        "",
        "The audit log alone, same machine, same run (scratch SQLite database, one thread):",
        "",
        f"- appends: {micro['appends_per_s']:.0f} records/s (each: one transaction, SHA-256 chain, an Ed25519 head signature, the head file)",
        f"- verify: {micro['verify_records_per_s']:.0f} records/s",
        f"- the load above used {rps / micro['appends_per_s'] * 100:.1f}% of the log's append capacity",
        "",
        f"The run lasts {a.seconds:g} s of load plus the time the last requests take to finish ({mem['elapsed']:.0f} s in all). "
        "The machine was shared with a model training run and other engineers' tests (load average below, on "
        f"{os.cpu_count()} CPUs), so absolute throughput and latency here say little about codemoat; the checks "
        "(no 5xx, one record per request, verify, flat memory) and the with/without ratio are what this run measures, "
        "and the ratio is only as steady as the machine's load between arms.",
        "",
        f"Load average at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1 / 5 / 15 min) on {os.cpu_count()} CPUs.",
    ]
    write_in_place(Path(a.out), "\n".join(lines))
    print("\n".join(lines))
    if five or not one_each or not vrep.get("ok"):
        sys.exit(1)


if __name__ == "__main__":
    main()
