"""Anonymous floods against `codemoat serve` with `policy.secrets = "block"` (issue 14 items 5 and 8).

A legitimate client sends one small completion at a time while, in another arm of the same run,
six clients without a token send 8 MiB bodies (code with an AWS key at the end) as fast as they
are answered. Reported side by side: the legitimate completion's latency (median, p90), how many
flood requests were answered, and how many audit records the flood left. Arms alternate
(quiet, flood, quiet, flood) so that the shared machine's load hits both alike.

With `--baseline-src`, the same arms also run on another checkout's sources (e.g. a git worktree
of the commit before the fix: `git worktree add /tmp/old <commit>`), in the same run.

    .venv/bin/python bench/trust_flood.py [--seconds 12] [--baseline-src /tmp/old/src]

Writes bench/results/trust_flood.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _results import write_in_place  # bench/ is the script's folder: other sections of the file stay

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "trust_flood.md"
MODEL = ROOT / "models" / "codemoat-tiny.gguf"
CODEMOAT = [sys.executable, "-m", "codemoat.cli.main"]
AWS = "AKIA" + "QWERTYUIOPASDFGH"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def big_body() -> bytes:
    """Just under the server's 8 MiB body limit (server.max_body_mb): code, then an AWS key."""
    line = "    total = sum(x * x for x in values if x % 3 == 0)  # squares of multiples of three\n"
    n = (8 * 1024 * 1024 - 4096) // (len(line) + 1)  # "\n" is two bytes in JSON
    body = json.dumps({"model": "codemoat-tiny", "prompt": line * n + f"key = '{AWS}'\n", "max_tokens": 8}).encode()
    assert len(body) < 8 * 1024 * 1024, len(body)
    return body


def start(src: str | None, home: Path, model: Path) -> tuple[subprocess.Popen, str, str]:
    env = dict(os.environ, CODEMOAT_HOME=str(home), CODEMOAT_POLICY__SECRETS="block", CODEMOAT_MODEL__N_THREADS="1")
    env.pop("CODEMOAT_DATABASE_URL", None)
    if src:
        env["PYTHONPATH"] = src
    tok = subprocess.run(
        [*CODEMOAT, "tokens", "create", "--name", "dev", "--json"], env=env, capture_output=True, text=True, check=True
    )
    token = json.loads(tok.stdout)["token"]
    port = free_port()
    log = open(home / f"serve-{port}.log", "w")
    proc = subprocess.Popen(
        [*CODEMOAT, "serve", "--model", str(model), "--model-id", "codemoat-tiny", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url, token
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            sys.exit(f"server exited: {(home / f'serve-{port}.log').read_text()[-2000:]}")
        time.sleep(0.1)
    sys.exit("server did not start")


def run_arm(url: str, token: str, flood: bool, seconds: float, body: bytes) -> dict:
    stop = threading.Event()
    answered: list[int] = []

    def flooder():
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                try:
                    r = c.post(url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
                    answered.append(r.status_code)
                except httpx.HTTPError:
                    pass

    threads = [threading.Thread(target=flooder, daemon=True) for _ in range(6 if flood else 0)]
    for t in threads:
        t.start()
    lat: list[float] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            r = c.post(
                "/v1/completions",
                json={"model": "codemoat-tiny", "prompt": "def add(a, b):\n", "max_tokens": 8, "temperature": 0},
            )
            lat.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    return {"lat": lat, "flood": answered}


def audit_count(home: Path, src: str | None) -> int:
    env = dict(os.environ, CODEMOAT_HOME=str(home))
    if src:
        env["PYTHONPATH"] = src
    r = subprocess.run([*CODEMOAT, "audit", "export"], env=env, capture_output=True, text=True, check=True)
    return sum(1 for line in r.stdout.splitlines() if line.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=12, help="Length of each arm.")
    ap.add_argument("--baseline-src", help="Another checkout's src/ folder, run side by side (e.g. the code before the fix).")
    ap.add_argument("--model", type=Path, default=MODEL)
    a = ap.parse_args()
    body = big_body()
    scratch = Path(tempfile.mkdtemp(prefix="codemoat-flood-"))
    trees = [("this checkout", None)] + ([("baseline", a.baseline_src)] if a.baseline_src else [])
    rows = []
    for name, src in trees:
        home = scratch / name.replace(" ", "-")
        home.mkdir(mode=0o700)
        proc, url, token = start(src, home, a.model)
        try:
            res = {"quiet": [], "flood": []}
            flood_answers: list[int] = []
            for arm in ("quiet", "flood", "quiet", "flood"):
                out = run_arm(url, token, arm == "flood", a.seconds, body)
                res[arm] += out["lat"]
                flood_answers += out["flood"]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        records = audit_count(home, src)
        legit = len(res["quiet"]) + len(res["flood"])
        statuses = {s: flood_answers.count(s) for s in sorted(set(flood_answers))}
        for arm in ("quiet", "flood"):
            lat = sorted(res[arm])
            rows.append(
                (
                    name,
                    arm,
                    len(lat),
                    statistics.median(lat) * 1000,
                    lat[int(len(lat) * 0.9)] * 1000,
                    statuses if arm == "flood" else "",
                    records - legit if arm == "flood" else "",
                )
            )
        print(rows[-2], rows[-1], flush=True)
    lines = [
        '# Anonymous 8 MiB floods with `policy.secrets = "block"` (bench/trust_flood.py)',
        "",
        f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; each arm {a.seconds:.0f} s, twice, "
        "alternating; six flooding clients without a token; the legitimate client: one 8-token completion at a time "
        "(greedy), 0.1 s apart.",
        "",
        "| code | arm | legit completions | median ms | p90 ms | flood answers (status: count) | audit records left by the flood |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, arm, n, med, p90, st, recs in rows:
        lines.append(f"| {name} | {arm} | {n} | {med:.0f} | {p90:.0f} | {st} | {recs} |")
    lines += [
        "",
        "Read each tree's arms against each other (quiet vs flood): between trees the quiet arms also differ for "
        "reasons outside the trust layer (engine isolation, prompt building), and the two cores are shared with "
        "other work, which shows in the tails. The flood's 401s are answered without the body being scanned; "
        "what it still costs is receiving and parsing 8 MiB bodies.",
        "",
        f"Command: `.venv/bin/python bench/trust_flood.py --seconds {a.seconds:g}"
        + (" --baseline-src <worktree of the commit before the fix>/src`" if a.baseline_src else "`"),
        "",
    ]
    write_in_place(RESULTS, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
