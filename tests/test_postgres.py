"""Shared state on PostgreSQL, as several replicas use it: migrations once, one audit history,
tokens honoured everywhere, and an outage that fails fast and heals without a restart.

Every test here runs against the private cluster of `tests/pg.py` (skipped, with the reason, only
when PostgreSQL is not installed); the SQLite half of the shared-state tests runs elsewhere.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import httpx
import pytest
import sqlalchemy as sa

from conftest import column, create_token, run_cli, verified_audit


def _migrate(url: str, start_at: float, out) -> None:
    """One replica starting: open (and migrate) the database at an agreed instant."""
    try:
        from codemoat.db import open_db

        time.sleep(max(0.0, start_at - time.time()))
        eng = open_db(url)
        with eng.connect() as c:
            n = c.execute(sa.text("select count(*) from alembic_version")).scalar()
        out.put(("ok", n))
    except Exception as e:  # reported to the test, which shows it
        out.put(("error", f"{type(e).__name__}: {e}"))


def test_replicas_starting_together_migrate_once(database_url):
    """Six processes open one empty database at the same instant (on SQLite: a server and CLI
    commands on a first run): every one succeeds, and the schema is created once. Without the
    lock (PostgreSQL's advisory lock, a flock beside an SQLite file) their CREATE TABLEs collided."""
    url = database_url
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 4  # spawned interpreters need ~1-2 s to import
    procs = [ctx.Process(target=_migrate, args=(url, start_at, out)) for _ in range(6)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(r[0] == "ok" for r in results), results
    heads = {r[1] for r in results}
    assert len(heads) == 1
    eng = sa.create_engine(url)
    with eng.connect() as c:
        versions = sorted(c.execute(sa.text("select version_num from alembic_version")).scalars())
    tables = set(sa.inspect(eng).get_table_names())
    eng.dispose()
    assert len(versions) == heads.pop() and len(set(versions)) == len(versions)
    assert {"users", "tokens", "audit_records", "audit_head"} <= tables


def _append(url: str, home: str, n: int, out) -> None:
    """One replica appending `n` audit records to the shared log."""
    try:
        os.environ["CODEMOAT_HOME"] = home
        from codemoat.audit.log import AuditLog
        from codemoat.db import open_db

        log = AuditLog(open_db(url), checkpoint_every=25)
        for i in range(n):
            log.append("request", user=f"u{os.getpid()}", route="/v1/completions", status=200, prompt_tokens=i)
        out.put(("ok", n))
    except Exception as e:
        out.put(("error", f"{type(e).__name__}: {e}"))


def test_audit_log_is_one_history_across_replicas(pg_cluster, home, monkeypatch):
    """Three replicas append at once: the records form one chain (appends serialise on the head
    row), every record is there once, and `audit verify` passes."""
    url = pg_cluster.new_database()
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    # the signing key lives in the shared data directory of this (test) deployment
    assert run_cli("audit", "verify").returncode == 0
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_append, args=(url, str(home), 120, out)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(r[0] == "ok" for r in results), results
    rep = verified_audit()
    assert rep["ok"] and rep["records"] == 360
    seqs = column(url, "select seq from audit_records order by seq")
    assert seqs == list(range(seqs[0], seqs[0] + 360))


def test_editing_a_record_on_postgres_is_detected(pg_cluster, home, monkeypatch):
    """The same tamper evidence as on SQLite: an edited row fails `audit verify`, naming it."""
    url = pg_cluster.new_database()
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    from codemoat.audit.log import AuditLog
    from codemoat.db import open_db

    eng = open_db(url)
    log = AuditLog(eng, checkpoint_every=10)
    for i in range(30):
        log.append("request", user="alice", route="/v1/completions", status=200, prompt_tokens=i)
    assert run_cli("audit", "verify").returncode == 0
    with eng.begin() as c:
        seq = c.execute(sa.text("select seq from audit_records order by seq limit 1 offset 12")).scalar()
        c.execute(sa.text("update audit_records set \"user\" = 'mallory' where seq = :s"), {"s": seq})
    eng.dispose()
    r = run_cli("audit", "verify", "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["first_bad"] == seq


@pytest.mark.slow
def test_two_replicas_share_tokens_and_audit(pg_cluster, tiny_gguf, serve_process, monkeypatch):
    """Two `codemoat serve` replicas on one PostgreSQL: a token made through the CLI works on
    both, its revocation is honoured by both within a second, and every request is audited once."""
    url = pg_cluster.new_database()
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    token = create_token("--name", "alice")
    a = serve_process(["--model", str(tiny_gguf)])
    b = serve_process(["--model", str(tiny_gguf)])
    body = {"model": tiny_gguf.stem, "prompt": "def add(a, b):\n    return", "max_tokens": 4, "temperature": 0}
    hdr = {"Authorization": f"Bearer {token}"}
    sent = 0
    for s in (a, b, a, b):
        r = httpx.post(s.url + "/v1/completions", json=body, headers=hdr, timeout=60)
        sent += 1
        assert r.status_code == 200, r.text
    assert run_cli("tokens", "revoke", "alice").returncode == 0
    t0 = time.monotonic()
    for s in (a, b):
        # A replica may honour a token it verified in the last 0.5 s (the verified-token cache):
        # the promise is "within a second", so ask until it refuses, for up to 5 s.
        while True:
            r = httpx.post(s.url + "/v1/completions", json=body, headers=hdr, timeout=60)
            sent += 1
            if r.status_code != 200 or time.monotonic() - t0 > 5:
                break
            time.sleep(0.1)
        assert r.status_code == 401, r.text
    assert time.monotonic() - t0 < 30  # a sanity bound on the test, not a performance target
    for s in (a, b):
        s.stop()
    verified_audit()
    assert column(url, "select count(*) from audit_records where route = '/v1/completions'") == [sent]


@pytest.mark.slow
def test_postgres_outage_fails_fast_and_heals(pg_cluster, tiny_gguf, serve_process, monkeypatch):
    """PostgreSQL stopped under a running replica: requests get the protocol's 503 at once (never a
    500, never a hang), and when it is back the same replica serves again, no restart; the log
    still verifies and holds exactly the requests that succeeded."""
    url = pg_cluster.new_database()
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    token = create_token("--name", "bob")
    s = serve_process(["--model", str(tiny_gguf)])
    body = {"model": tiny_gguf.stem, "prompt": "x = ", "max_tokens": 2, "temperature": 0}
    hdr = {"Authorization": f"Bearer {token}"}
    ok = 0
    assert httpx.post(s.url + "/v1/completions", json=body, headers=hdr, timeout=60).status_code == 200
    ok += 1
    pg_cluster.pause()
    try:
        for _ in range(3):
            r = httpx.post(s.url + "/v1/completions", json=body, headers=hdr, timeout=60)
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["type"] and "Traceback" not in r.text
            o = httpx.post(
                s.url + "/api/generate", json={"model": tiny_gguf.stem, "prompt": "x", "stream": False}, headers=hdr, timeout=60
            )
            assert o.status_code == 503 and "error" in o.json(), o.text
    finally:
        pg_cluster.resume()
    deadline = time.time() + 30
    while True:
        r = httpx.post(s.url + "/v1/completions", json=body, headers=hdr, timeout=60)
        if r.status_code == 200 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    ok += 1
    assert s.proc.poll() is None  # the replica never exited
    s.stop()
    verified_audit()
    assert column(url, "select count(*) from audit_records where route = '/v1/completions' and status = 200") == [ok]


@pytest.mark.slow
def test_outage_answers_keep_the_connection_and_the_log_quiet(pg_cluster, tiny_gguf, serve_process, monkeypatch):
    """While PostgreSQL is down, each request's 503 comes on a connection the client (or the load
    balancer in front) can keep using, and the log says it in a line, with no traceback. Before, the
    database error went past the audit layer to uvicorn, which logged 'Exception in ASGI
    application' with a traceback and closed the connection after the 503; HAProxy then sent the
    next request on that closed connection and cut the editor's request off with no answer."""
    import http.client

    url = pg_cluster.new_database()
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    token = create_token("--name", "carol")
    s = serve_process(["--model", str(tiny_gguf)])
    hdr = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = json.dumps({"model": tiny_gguf.stem, "prompt": "x = ", "max_tokens": 2})
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.request("POST", "/v1/completions", body, hdr)
    assert conn.getresponse().read() and conn.sock is not None
    pg_cluster.pause()
    try:
        for path, req in (("/v1/completions", body), ("/api/generate", json.dumps({"model": tiny_gguf.stem, "prompt": "x"}))):
            for _ in range(2):  # on the same kept-alive connection each time
                conn.request("POST", path, req, hdr)
                r = conn.getresponse()
                assert r.status == 503 and "error" in json.loads(r.read())
    finally:
        pg_cluster.resume()
        conn.close()
    out = s.output()
    assert "Traceback" not in out and "Exception in ASGI application" not in out, out[-3000:]
