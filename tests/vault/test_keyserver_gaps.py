"""Attacker's tests (a second pass over the key server, the lease client and vaultd): gaps the other attack
files left.

- A customer's admin holds an offline license (and the machine key) and asks the key server for a lease on
  it: the challenge was granted and the lease itself was a 500 with a traceback (the offline row has no TTL).
- Anyone who can reach a key server on PostgreSQL sends an id or nonce holding a NUL: PostgreSQL refuses it
  in any text parameter, a 500 with the SQL and a traceback in the log, from an unsigned challenge.
- The vendor database goes down under a key server on PostgreSQL: every request was a 500 and a traceback.
- An on-path proxy answers a lease request with an endless body at full speed: the client read it all into
  memory (gigabytes in seconds) before any deadline could end the wait.
- A local user on one model's vaultd allow-list asks for another model under a name holding a newline:
  vaultd logged it as it came, so the caller wrote log lines of its choosing ("handed ... to uid 0").
- The customer's own proxy keeps one genuine challenge and lease and answers every later challenge with that
  nonce and every lease request with that lease: the challenge was unsigned, so one lease served any number
  of replicas of a 1-seat license, for good, after the vendor revoked it.
- An unknown route or a wrong method got {"detail": ...}, not the protocol's signed error shape.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import tracemalloc

import httpx
import pytest

from codemoat.vault.codec import b64d, b64e, canonical, ed_public, sign, verify
from codemoat.vault.daemon import Offer, VaultDaemon
from codemoat.vault.keyserver import REFUSAL_DOMAIN, REQUEST_DOMAIN, request_message
from codemoat.vault.lease import LeaseClient, Unreachable
from codemoat.vault.license import License
from codemoat.vault.wire import MAX_MESSAGE
from proxy import RewritingProxy
from vaulthelp import bundle

from .conftest import KeyServerProcess


def _signed(machine, lid: str, nonce: str) -> dict:
    req = {"license_id": lid, "machine_id": machine.id, "nonce": nonce, "client_time": int(time.time())}
    req["signature"] = b64e(sign(machine.ed25519, REQUEST_DOMAIN, request_message(req)))
    return req


def _signed_refusal(vendor, r: httpx.Response, status: int, code: str) -> dict:
    where = (r.status_code, r.text[:300])
    assert r.status_code == status and "Traceback" not in r.text, where
    err = r.json()["error"]
    assert err["code"] == code, where
    verify(ed_public(vendor.keyserver_key_b64, "k"), b64d(r.json()["signature"]), REFUSAL_DOMAIN, canonical(err), "r")
    return err


def _no_errors_logged(caplog) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage()[:300] for r in errors]


@pytest.fixture
def uvicorn_log(caplog):
    """uvicorn's log, which does not propagate to the root logger caplog watches, into caplog."""
    caplog.set_level(logging.WARNING)
    log = logging.getLogger("uvicorn")
    log.addHandler(caplog.handler)
    yield caplog
    log.removeHandler(caplog.handler)


def test_an_offline_license_gets_no_challenge_and_no_lease_only_a_signed_refusal(
    vendor, machine, model, tmp_path, keyserver, uvicorn_log
):
    _, _, doc = bundle(vendor, model, tmp_path / "a", machine)  # offline: its key is in the file already
    lid = doc["license"]["id"]
    ks = keyserver.server.config.app.state.keyserver
    r = httpx.post(keyserver.url + "/v1/lease/challenge", json={"license_id": lid, "client_nonce": "c1"})
    assert _signed_refusal(vendor, r, 404, "unknown_license")["nonce"] == "c1"
    assert ks.nonces.count() == 0  # no state kept for it
    nonce = ks.nonces.issue(lid, 60)  # a nonce as the old server handed out for it
    for path in ("/v1/lease", "/v1/lease/release"):
        r = httpx.post(keyserver.url + path, json=_signed(machine, lid, nonce))
        _signed_refusal(vendor, r, 404, "unknown_license")
    assert ks.live_leases(lid) == 0
    _no_errors_logged(uvicorn_log)


@contextlib.contextmanager
def _keyserver_on_postgresql(pg_cluster, machine, model, tmp_path, caplog):
    """(vendor, key server, license file, license id) of a vendor on a database of its own in `pg_cluster`, uvicorn's
    log also going to `caplog`; all of it stopped and dropped after."""
    from codemoat.vault.vendor import Vendor

    url = pg_cluster.new_database()
    Vendor.init(tmp_path / "vendor", database_url=url).close()
    v = Vendor.open(tmp_path / "vendor")
    ks = KeyServerProcess(v).start()
    caplog.set_level(logging.WARNING)
    uv = logging.getLogger("uvicorn")
    uv.addHandler(caplog.handler)
    try:
        _, lic, doc = bundle(v, model, tmp_path / "a", machine, mode="lease", keyserver=ks.url)
        yield v, ks, lic, doc["license"]["id"]
    finally:
        uv.removeHandler(caplog.handler)
        ks.stop()
        v.close()
        pg_cluster.drop_database(url)


def test_a_nul_or_control_character_in_an_id_is_a_signed_400_on_postgresql(pg_cluster, machine, model, tmp_path, caplog):
    with _keyserver_on_postgresql(pg_cluster, machine, model, tmp_path, caplog) as (v, ks, lic, lid):
        for bad in ("lic\x00", "lic\x1b[2J"):  # anyone: no signature needed for a challenge
            r = httpx.post(ks.url + "/v1/lease/challenge", json={"license_id": bad, "client_nonce": "c"})
            _signed_refusal(v, r, 400, "bad_request")
        good = httpx.post(ks.url + "/v1/lease/challenge", json={"license_id": lid}).json()["nonce"]
        for l_id, nonce in ((lid, "n\x00"), (lid + "\x00", good), (lid, good + "\n")):  # signed by the machine
            for path in ("/v1/lease", "/v1/lease/release"):
                req = _signed(machine, l_id, nonce)
                _signed_refusal(v, httpx.post(ks.url + path, json=req), 400, "bad_request")
        assert LeaseClient(License.load(lic), machine).acquire().seats_used == 1  # the nonce was not spent
        _no_errors_logged(caplog)


def test_a_vendor_database_outage_is_a_signed_503_not_a_500(pg_cluster, machine, model, tmp_path, caplog):
    with _keyserver_on_postgresql(pg_cluster, machine, model, tmp_path, caplog) as (v, ks, _lic, lid):
        nonce = httpx.post(ks.url + "/v1/lease/challenge", json={"license_id": lid}).json()["nonce"]
        pg_cluster.pause()
        try:
            r = httpx.post(ks.url + "/v1/lease", json=_signed(machine, lid, nonce), timeout=60)
            assert _signed_refusal(v, r, 503, "database_unavailable")["nonce"] == nonce
            r = httpx.post(ks.url + "/v1/lease/challenge", json={"license_id": lid + "x", "client_nonce": "c"}, timeout=60)
            _signed_refusal(v, r, 503, "database_unavailable")
            _no_errors_logged(caplog)
            assert any("database unreachable" in r.getMessage() for r in caplog.records)
        finally:
            pg_cluster.resume()
        deadline = time.monotonic() + 30  # the pool reconnects once the database is back
        while (r := httpx.post(ks.url + "/v1/lease", json=_signed(machine, lid, nonce))).status_code == 503:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        assert r.status_code == 200, r.text  # the nonce was not spent by the outage


class _Firehose:
    """A key server (or the proxy in front of it) that answers 200 with `sent` bytes of a body it says is 1 GiB
    long, as fast as the socket takes them, then holds the connection open and sends no more."""

    def __init__(self, sent: int):
        self.sent, self.closed = sent, threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _one(self, c: socket.socket) -> None:
        try:
            c.recv(65536)
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1073741824\r\n\r\n")
            left, chunk = self.sent, b" " * 65536
            while left > 0:
                c.sendall(chunk)
                left -= len(chunk)
            c.settimeout(10)
            c.recv(1)  # until the client closes
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()


def test_an_endless_answer_is_not_read_into_memory(vendor, machine, model, tmp_path):
    hose = _Firehose(48 << 20)
    try:
        _, lic, _ = bundle(vendor, model, tmp_path / "a", machine, mode="lease", keyserver=hose.url)
        client = LeaseClient(License.load(lic), machine, timeout=2)
        tracemalloc.start()
        try:
            with pytest.raises(Unreachable) as e:
                client.bounded(client.acquire)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            client.close()
    finally:
        hose.close()
    assert "Timeout" not in str(e.value), str(e.value)  # cut off at the limit, not after reading all it sent
    assert peak < 8 << 20, f"the client held {peak >> 20} MiB of an answer"
    from codemoat.audit.outbound import read_outbound

    answered = [r["status"] for r in read_outbound() if r.get("body") is None and hose.url in r["destination"]]
    assert answered == [0], answered  # recorded as no answer, not as the 200 its head said (a reviewer)


def test_a_model_name_cannot_write_log_lines_of_its_own(tmp_path, caplog):
    """A caller on one model's list (`--allow-uid m2=USER`) asks for m1 under a name with a newline: the refusal is
    logged, and the name must stay inside its own line."""
    caplog.set_level(logging.INFO, logger="codemoat.vault")
    fd = socket.socket()
    d = VaultDaemon(tmp_path / "v.sock", per_model={"m2": ({os.getuid()}, set())}).start()
    try:
        d.offer(Offer("m1", fd.fileno(), 1, {}))
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(10)
        s.connect(d.path)
        s.send(b'{"op": "get", "model": "m1\\nvaultd: handed m1 to pid 1 uid 0"}')
        assert b'"ok": false' in s.recv(MAX_MESSAGE)
        s.close()
    finally:
        d.close()
        fd.close()
    lines = [line for r in caplog.records for line in r.getMessage().splitlines()]
    assert any("refused" in line for line in lines)
    assert not [line for line in lines if line.startswith("vaultd: handed")], lines


@pytest.fixture
def replaying(keyserver):
    """The customer's own proxy in front of the key server: it keeps the first challenge answer and the first
    lease granted, and from then on answers every challenge and every lease request with those."""
    kept: dict[str, tuple[int, bytes]] = {}

    def rewrite(path, status, body):
        if path in ("/v1/lease/challenge", "/v1/lease"):
            if path in kept:
                return kept[path]
            if status == 200:
                kept[path] = (status, body)
        return status, body

    p = RewritingProxy(keyserver.url, rewrite).start()
    yield p
    p.stop()


def test_a_lease_answer_kept_by_a_proxy_cannot_be_replayed_to_another_replica_or_after_revocation(
    vendor, machine, model, tmp_path, replaying
):
    """The challenge's nonce came unsigned: a proxy handed every later challenge the nonce of a lease it had kept,
    then that lease (signed, bound to that very nonce), so one genuine lease served any number of replicas, on a
    1-seat license, and after the vendor revoked it; a keeper that lost its renewal re-challenged into the same."""
    _, lic_file, _ = bundle(vendor, model, tmp_path / "a", machine, mode="lease", keyserver=replaying.url, seats=1)
    lic = License.load(lic_file)
    first = LeaseClient(lic, machine)
    assert first.acquire().seats_used == 1  # genuine: the proxy keeps it
    vendor.revoke(lic.id)
    for _ in range(3):  # more replicas than seats, after the revocation
        other = LeaseClient(lic, machine)
        try:
            with pytest.raises(Unreachable, match="challenge"):
                other.acquire()
        finally:
            other.close()
    first._next_nonce = None  # its renewal failed (the proxy dropped it): the next one asks for a challenge
    with pytest.raises(Unreachable, match="challenge"):
        first.acquire()
    first.close()


def test_a_key_server_older_than_the_client_is_named_as_such(vendor, machine, model, tmp_path):
    """A key server of the version before signed challenges answers `{"nonce", "expires_in"}`: the client treats it
    as unreachable (it cannot tell it from a proxy that stripped the signature), and says which upgrade comes first,
    rather than only that the answer had no valid signature."""
    from http.server import BaseHTTPRequestHandler

    from localhttp import LocalHTTP

    class OldKeyServer(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b'{"nonce": "bm9uY2U=", "expires_in": 60}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with LocalHTTP(OldKeyServer) as old:
        _, lic_file, _ = bundle(vendor, model, tmp_path / "a", machine, mode="lease", keyserver=old.url, seats=1)
        client = LeaseClient(License.load(lic_file), machine)
        try:
            with pytest.raises(Unreachable, match="older than this client \\(upgrade key servers before the servers"):
                client.acquire()
        finally:
            client.close()


def test_no_route_and_a_wrong_method_are_signed_refusals_in_the_protocols_shape(vendor, keyserver):
    for method, path, status, code in [
        ("POST", "/v1/lease/renew", 404, "not_found"),
        ("GET", "/", 404, "not_found"),
        ("GET", "/v1/lease", 405, "method_not_allowed"),
        ("PUT", "/v1/lease/challenge", 405, "method_not_allowed"),
        ("POST", "/health", 405, "method_not_allowed"),
    ]:
        r = httpx.request(method, keyserver.url + path, json={"license_id": "lic"})
        assert _signed_refusal(vendor, r, status, code)["message"], (method, path)
        if status == 405:
            assert r.headers["allow"] in ("GET", "POST")


def test_a_control_character_in_an_id_is_a_signed_400_on_sqlite_too(vendor, keyserver):
    for bad in ("lic\x00", "lic\n", "lic\x1b[2J", "lic\u2028"):
        r = httpx.post(keyserver.url + "/v1/lease/challenge", json={"license_id": bad, "client_nonce": "c"})
        assert "printable" in _signed_refusal(vendor, r, 400, "bad_request")["message"]
