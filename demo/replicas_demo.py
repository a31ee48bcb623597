"""Demo step 60: two `codemoat serve` replicas on one PostgreSQL behind HAProxy (deploy/haproxy.cfg).

A token made on one replica's host works on both; one replica is killed in the middle of a streamed
completion; the next requests go to the other; the shared audit log still verifies. PostgreSQL
runs as a private throw-away cluster (tests/pg.py) on a free loopback port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from haproxy import HAProxy, haproxy_bin  # noqa: E402
from pg import PgCluster, pg_bin  # noqa: E402

CODEMOAT = os.environ.get("CODEMOAT", "codemoat")
DEMO = Path(os.environ["DEMO"])
MODEL = sys.argv[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str) -> str:
    r = subprocess.run([CODEMOAT, *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"codemoat {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def wait(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not come up")


def main() -> None:
    if pg_bin() is None or haproxy_bin() is None:
        print("(skipped: this step needs Debian's postgresql and haproxy packages; `.ci/run` installs them)")
        return
    procs: list[subprocess.Popen] = []
    pg = PgCluster(pg_bin()).start()
    try:
        url = pg.new_database()
        os.environ["CODEMOAT_DATABASE_URL"] = url
        print(
            f"PostgreSQL 15 on 127.0.0.1:{pg.port} (a private cluster for this demo); every replica: "
            "database_url = postgresql+psycopg://…"
        )
        replicas = []
        for i in (1, 2):
            port = free_port()
            log = open(DEMO / f"replica{i}.log", "w")
            p = subprocess.Popen(
                [CODEMOAT, "serve", "--model", MODEL, "--host", "127.0.0.1", "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            procs.append(p)
            replicas.append((f"http://127.0.0.1:{port}", p))
        for i, (u, p) in enumerate(replicas, 1):
            wait(u, p, f"replica{i}")
        ha = HAProxy.start(DEMO / "haproxy.log", replicas[0][0], replicas[1][0])
        procs.append(ha.proc)
        lb = ha.url
        print(f"replica1 {replicas[0][0]}, replica2 {replicas[1][0]}, HAProxy {lb} (deploy/haproxy.cfg)")

        token = json.loads(cli("tokens", "create", "--name", "alice", "--json"))["token"]
        print("alice's token made on replica1's host (`codemoat tokens create`: it lands in PostgreSQL)")
        hdr = {"Authorization": f"Bearer {token}"}
        model = httpx.get(replicas[1][0] + "/v1/models", headers=hdr, timeout=30).json()["data"][0]["id"]
        body = {"model": model, "prompt": "def add(a, b):\n    return", "max_tokens": 6, "temperature": 0}
        for u, _ in replicas:
            r = httpx.post(u + "/v1/completions", json=body, headers=hdr, timeout=60)
            print(f"  straight to {u}: {r.status_code} {r.json()['choices'][0]['text']!r}")

        ok = 0
        with httpx.stream(
            "POST", lb + "/v1/completions", json={**body, "max_tokens": 300, "stream": True}, headers=hdr, timeout=60
        ) as s:
            name = s.headers["x-codemoat-replica"]
            lines = s.iter_lines()
            next(lines)
            victim = replicas[int(name[-1]) - 1][1]
            os.killpg(victim.pid, signal.SIGKILL)
            print(f"a streamed completion through HAProxy is served by {name}: SIGKILL {name} mid-stream")
            try:
                for _ in lines:
                    pass
                print("  (the stream ended before the kill reached it)")
            except httpx.HTTPError as e:
                print(f"  that one stream is cut off ({type(e).__name__}); nothing else is lost")
        victim.wait(timeout=30)
        answered = {}
        for _ in range(6):
            r = httpx.post(lb + "/v1/completions", json=body, headers=hdr, timeout=60)
            answered[r.headers.get("x-codemoat-replica", "?")] = answered.get(r.headers.get("x-codemoat-replica", "?"), 0) + 1
            ok += r.status_code == 200
        print(f"next 6 requests through HAProxy: {ok} answered 200, by {answered}")
        for _, p in replicas:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)
        rep = json.loads(cli("audit", "verify", "--json"))
        print(
            f"codemoat audit verify (the shared log, both replicas' records): "
            f"{'OK' if rep['ok'] else 'FAILED'}, {rep['records']} records, {rep['checkpoints']} signed checkpoints"
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        pg.stop()


if __name__ == "__main__":
    main()
