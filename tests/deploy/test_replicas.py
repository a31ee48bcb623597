"""Two `codemoat serve` replicas on one PostgreSQL behind a real HAProxy (deploy/haproxy.cfg as
shipped): a replica killed in the middle of a streamed completion costs only that stream, the
load balancer sends the next requests to the other replica, and the audit log keeps exactly one
record per completed request and still verifies; PostgreSQL stopped for 5 s under load costs the
requests in the gap a 503 and nothing else."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter

import httpx
import pytest

from conftest import column, create_token, verified_audit
from haproxy import HAProxy, haproxy_bin

pytestmark = pytest.mark.slow


@pytest.fixture
def haproxy(tmp_path):
    """Start HAProxy with deploy/haproxy.cfg for the given replica URLs; stopped after the test."""
    if haproxy_bin() is None:
        pytest.skip("HAProxy is not installed here (Debian package `haproxy`; .ci/run installs it)")
    started: list[HAProxy] = []

    def start(*replicas: str) -> str:
        started.append(HAProxy.start(tmp_path / "haproxy.log", *replicas))
        return started[-1].url

    yield start
    for h in started:
        h.stop()


def _audited(url: str, route: str) -> int:
    return column(url, "select count(*) from audit_records where route = :r and status = 200", r=route)[0]


def test_the_address_recorded_through_haproxy_is_the_editors(tiny_gguf, serve_process, haproxy):
    """deploy/haproxy.cfg appends the editor's address (option forwardfor) and a replica that names
    HAProxy in server.trusted_proxies records it; what the editor put in X-Forwarded-For is not
    believed. Fails before: no forwardfor, and the replica believed the editor's own header."""
    replica = serve_process(["--model", str(tiny_gguf)], env={"CODEMOAT_SERVER__TRUSTED_PROXIES": '["127.0.0.1"]'})
    lb = haproxy(replica.url, replica.url)
    editor = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))  # not HAProxy's address
    with editor:
        r = editor.post(lb + "/v1/completions", json={"prompt": "x"}, headers={"X-Forwarded-For": "203.0.113.9"})
    assert r.status_code == 401
    assert replica.stop() == 0
    assert column(f"sqlite:///{os.environ['CODEMOAT_HOME']}/codemoat.db", "select client from audit_records") == ["127.0.0.2"]


def test_an_editors_forwarded_proto_does_not_pass_haproxy(tiny_gguf, serve_process, haproxy):
    """A replica behind HAProxy names it in server.trusted_proxies, so it believes the X-Forwarded-Proto that
    reaches it (the console's session cookie is then Secure). deploy/haproxy.cfg listens on plain HTTP and drops
    the header an editor sent: a caller over plain HTTP cannot have the replica take its request for HTTPS.
    Fails before: the header passed through and the cookie came back Secure."""
    import re

    admin = create_token("--name", "ops", "--scopes", "admin")
    replica = serve_process(["--model", str(tiny_gguf)], env={"CODEMOAT_SERVER__TRUSTED_PROXIES": '["127.0.0.1"]'})
    lb = haproxy(replica.url, replica.url)
    with httpx.Client(base_url=lb) as c:
        form = c.get("/admin/signin")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        r = c.post(
            "/admin/signin", data={"csrf": csrf, "token": admin}, headers={"X-Forwarded-Proto": "https"}, follow_redirects=False
        )
    assert r.status_code == 303, r.text
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("codemoat_session="))
    assert "secure" not in {p.strip().split("=")[0].lower() for p in cookie.split(";")}, cookie
    with httpx.Client(base_url=replica.url) as c:  # the replica itself, from its trusted address: believed
        form = c.get("/admin/signin")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        r = c.post(
            "/admin/signin", data={"csrf": csrf, "token": admin}, headers={"X-Forwarded-Proto": "https"}, follow_redirects=False
        )
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("codemoat_session="))
    assert "secure" in {p.strip().split("=")[0].lower() for p in cookie.split(";")}, cookie
    assert replica.stop() == 0


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

    assert verified_audit()["ok"]
    assert _audited(url, "/v1/completions") == completed


def _load(lb: str, token: str, model: str, worker: int, stop: threading.Event, out: list) -> None:
    """One editor sending requests through HAProxy until `stop`; each prompt carries a tag
    (`#req w-i`) that its audit record keeps (audit.retain_text), so records match requests one to one.
    Worker 0 speaks Ollama's protocol, the others OpenAI's."""
    hdr = {"Authorization": f"Bearer {token}"}
    i = 0
    with httpx.Client(timeout=120) as c:
        while not stop.is_set():
            tag = f"#req {worker}-{i}"
            i += 1
            prompt = f"{tag}\nx = "
            if worker == 0:
                route, body = "/api/generate", {"model": model, "prompt": prompt, "stream": False, "options": {"num_predict": 2}}
            else:
                route, body = "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0}
            t0 = time.monotonic()
            try:
                r = c.post(lb + route, json=body, headers=hdr)
                out.append((tag, route, r.status_code, r.text, t0, time.monotonic()))
            except httpx.HTTPError as e:  # a hang or a cut connection: the test fails on it
                out.append((tag, route, -1, repr(e), t0, time.monotonic()))


def test_postgres_stopped_under_load_behind_haproxy(pg_cluster, tiny_gguf, serve_process, haproxy, monkeypatch):
    """PostgreSQL stopped for 5 s while four editors send requests through HAProxy to two replicas,
    then started again: requests in the gap get a 503 in their own protocol, at once (while the
    database is still down, not when it is back); nothing else fails; both replicas serve again
    without a restart; every request that succeeded has exactly one audit record (matched by the tag
    in its prompt), no record claims a success the client did not get, and `audit verify` passes."""
    url = pg_cluster.new_database()
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    monkeypatch.setenv("CODEMOAT_AUDIT__RETAIN_TEXT", "true")
    monkeypatch.setenv("CODEMOAT_MODEL__N_THREADS", "1")  # two replicas on a small machine: no spin-barrier stalls
    token = create_token("--name", "alice")
    replicas = [serve_process(["--model", str(tiny_gguf)]) for _ in range(2)]
    lb = haproxy(*(r.url for r in replicas))

    def succeeded() -> int:
        return sum(1 for x in list(out) if x[2] == 200)

    stop, out = threading.Event(), []
    workers = [threading.Thread(target=_load, args=(lb, token, tiny_gguf.stem, w, stop, out)) for w in range(4)]
    for t in workers:
        t.start()
    try:
        deadline = time.time() + 120
        while succeeded() < 20 and time.time() < deadline:
            time.sleep(0.2)
        assert succeeded() >= 20, out[-5:]
        pg_cluster.pause()  # pg_ctl stop -m fast: connections in use are cut
        stopped_at = time.monotonic()
        time.sleep(5)
        resumed_at = time.monotonic()
        pg_cluster.resume()
        before = succeeded()
        deadline = time.time() + 60
        while succeeded() < before + 20 and time.time() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in workers:
            t.join(timeout=180)
    assert not any(t.is_alive() for t in workers), "a request hung"

    statuses = {s for _, _, s, _, _, _ in out}
    assert statuses <= {200, 503}, ([x for x in out if x[2] not in (200, 503)][:3], stopped_at, resumed_at)
    refused = [x for x in out if x[2] == 503]
    assert refused, "no request fell in the gap"
    for _, route, _, text, _, _ in refused:  # the caller's protocol: OpenAI's error object, Ollama's string
        err = json.loads(text)["error"]
        assert (isinstance(err, str) if route == "/api/generate" else err["type"]) and "Traceback" not in text
    # fail fast: refusals came while the database was still down, not when it came back
    assert any(stopped_at <= end < resumed_at for *_, end in refused)
    assert succeeded() >= before + 20  # served again after the restart...
    for r in replicas:  # ...by both replicas, which never exited
        assert r.proc.poll() is None
        got = httpx.post(
            r.url + "/v1/completions",
            json={"model": tiny_gguf.stem, "prompt": "#req direct\n", "max_tokens": 2},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert got.status_code == 200, got.text
        out.append(("#req direct", "/v1/completions", 200, got.text, 0.0, 0.0))
    for r in replicas:
        r.stop()

    verified_audit()
    texts = column(url, "select prompt_text from audit_records where kind = 'request' and status = 200")
    audited = Counter(t.split("\n", 1)[0] for t in texts if t and t.startswith("#req "))
    ok = Counter(tag for tag, _, s, *_ in out if s == 200)
    assert ok == audited, (ok - audited, audited - ok)  # none lost, none doubled, none made up
