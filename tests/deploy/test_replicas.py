"""Two `codemoat serve` replicas on one PostgreSQL behind a real HAProxy (deploy/haproxy.cfg as
shipped): a replica killed in the middle of a streamed completion costs only that stream, the
load balancer sends the next requests to the other replica, and the audit log keeps exactly one
record per completed request and still verifies."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import httpx
import pytest
import sqlalchemy as sa

from conftest import ROOT, create_token, free_port, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def haproxy(tmp_path):
    """Start HAProxy with deploy/haproxy.cfg for the given replica URLs; stopped after the test."""
    exe = shutil.which("haproxy")
    if exe is None:
        pytest.skip("HAProxy is not installed here (Debian package `haproxy`; .ci/run installs it)")
    procs: list[subprocess.Popen] = []

    def start(*replicas: str) -> str:
        port = free_port()
        env = dict(
            os.environ,
            CODEMOAT_LB_BIND=f"127.0.0.1:{port}",
            CODEMOAT_LB_STATS=f"127.0.0.1:{free_port()}",
            CODEMOAT_REPLICA1=replicas[0].removeprefix("http://"),
            CODEMOAT_REPLICA2=replicas[1].removeprefix("http://"),
        )
        log = open(tmp_path / "haproxy.log", "w")
        p = subprocess.Popen(
            [exe, "-db", "-f", str(ROOT / "deploy" / "haproxy.cfg")], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        procs.append(p)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            assert p.poll() is None, (tmp_path / "haproxy.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("HAProxy did not come up:\n" + (tmp_path / "haproxy.log").read_text())

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def _audited(url: str, route: str) -> int:
    eng = sa.create_engine(url)
    with eng.connect() as c:
        n = c.execute(sa.text("select count(*) from audit_records where route = :r and status = 200"), {"r": route}).scalar()
    eng.dispose()
    return n


def test_replica_killed_mid_stream(pg_cluster, tiny_gguf, serve_process, haproxy, monkeypatch):
    url = pg_cluster.new_database()
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    token = create_token("--name", "alice")
    replicas = [serve_process(["--model", str(tiny_gguf)]) for _ in range(2)]
    lb = haproxy(*(r.url for r in replicas))
    hdr = {"Authorization": f"Bearer {token}"}
    body = {"model": tiny_gguf.stem, "prompt": "def add(a, b):\n    return", "max_tokens": 4, "temperature": 0}

    completed = 0
    seen = set()
    for _ in range(6):
        r = httpx.post(lb + "/v1/completions", json=body, headers=hdr, timeout=60)
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-codemoat-replica"])
        completed += 1
    assert seen == {"replica1", "replica2"}  # both serve: one database, one token table

    # a long stream; kill whichever replica serves it once the first tokens have arrived
    long = {**body, "max_tokens": 400, "stream": True, "stop": []}
    with httpx.stream("POST", lb + "/v1/completions", json=long, headers=hdr, timeout=60) as s:
        assert s.status_code == 200
        victim = replicas[int(s.headers["x-codemoat-replica"][-1]) - 1]
        lines = s.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(victim.proc.pid, signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            for _ in lines:
                pass
    victim.proc.wait(timeout=30)
    survivor = next(r for r in replicas if r is not victim)

    # the next requests all succeed, on the survivor
    for _ in range(6):
        r = httpx.post(lb + "/v1/completions", json=body, headers=hdr, timeout=60)
        assert r.status_code == 200, r.text
        completed += 1
    assert survivor.proc.poll() is None
    survivor.stop()

    r = run_cli("audit", "verify", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["ok"]
    assert _audited(url, "/v1/completions") == completed
