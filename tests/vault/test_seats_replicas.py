"""License seats per serving process: three replicas on one machine against a real key server and a
2-seat lease license, the third refused with a one-line reason until a seat frees (and kept out of
HAProxy's rotation meanwhile); and the
attacks on per-instance seats (a forged instance id, a flood of made-up instances)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import sqlalchemy as sa

from codemoat.vault.codec import b64e, public_raw
from codemoat.vault.keyserver import REQUEST_DOMAIN, KeyServer, LeaseDenied
from codemoat.vault.lease import LeaseClient
from codemoat.vault.license import License
from haproxy import HAProxy, haproxy_bin
from vaulthelp import bundle, cli

from .conftest import free_port


def _license(vendor, model, tmp_path, machine, url, seats=2, **kw):
    kw.setdefault("lease_ttl", 600)
    _, lic, doc = bundle(vendor, model, tmp_path / "out", machine, mode="lease", keyserver=url, seats=seats, **kw)
    return License.load(lic)


def _rows(vendor, lid: str) -> int:
    with vendor.engine.connect() as c:
        return c.execute(sa.text("select count(*) from vault_leases where license_id = :l"), {"l": lid}).scalar_one()


def test_forged_instance_id_cannot_renew_or_release_another_seat(vendor, machine, model, tmp_path, keyserver):
    lic = _license(vendor, model, tmp_path, machine, keyserver.url, seats=2)
    a = LeaseClient(lic, machine)
    assert a.acquire().seats_used == 1
    thief = LeaseClient(lic, machine)  # same machine key (a replica beside it), its own instance key
    thief.instance = a.instance  # claims A's seat by naming A's public key
    with pytest.raises(LeaseDenied) as e:
        thief.acquire()
    assert e.value.code == "bad_signature" and "instance" in str(e.value)
    thief.release()  # best effort, refused: A's seat stays
    probe = KeyServer(vendor)
    assert probe.live_leases(lic.id) == 1
    assert a.acquire().seats_used == 1  # A renews its own seat
    # an instance named without its signature is refused the same way
    nonce = httpx.post(keyserver.url + "/v1/lease/challenge", json={"license_id": lic.id}).json()["nonce"]
    req = a._signed_request(nonce, REQUEST_DOMAIN)
    del req["instance_signature"]
    r = httpx.post(keyserver.url + "/v1/lease", json=req)
    assert r.status_code == 401 and r.json()["error"]["code"] == "bad_signature"
    a.release()  # the owner's release works
    assert probe.live_leases(lic.id) == 0
    a.close()
    thief.close()


def test_flood_of_instances_from_one_machine_is_bounded(vendor, machine, model, tmp_path, keyserver):
    lic = _license(vendor, model, tmp_path, machine, keyserver.url, seats=2)
    legit = LeaseClient(lic, machine)
    legit.acquire()
    granted, refused = 0, []
    for _ in range(30):  # 30 made-up instances, each with its own key, all from the licensed machine
        c = LeaseClient(lic, machine)
        try:
            c.acquire()
            granted += 1
        except LeaseDenied as e:
            refused.append(e.code)
        c.close()
    assert granted == 1 and refused == ["seats_exhausted"] * 29  # the one free seat, nothing more
    assert _rows(vendor, lic.id) == 2  # refused instances leave no row behind
    assert legit.acquire().seats_used == 2  # and the live seat is never taken from its holder
    legit.close()


def test_each_instance_key_is_new_and_public_only(vendor, machine, model, tmp_path, keyserver):
    lic = _license(vendor, model, tmp_path, machine, keyserver.url)
    a, b = LeaseClient(lic, machine), LeaseClient(lic, machine)
    assert a.instance != b.instance and len(a.instance) == 44  # base64 of a 32-byte Ed25519 public key
    assert a.instance == b64e(public_raw(a._instance_key.public_key()))
    a.close()
    b.close()


# -- three real replicas, two seats ------------------------------------------------------------
def _serve(moat, lic, port, log):
    env = dict(os.environ, CODEMOAT_MODEL__N_CTX="256", CODEMOAT_MODEL__N_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "codemoat.cli.main", "serve", "--model", str(moat), "--license", str(lic), "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _wait_status(port: int, want: int, proc, log_path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log_path.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == want:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"/health never answered {want}:\n{log_path.read_text()}")


@pytest.mark.slow
def test_three_replicas_on_two_seats(vendor, machine, gguf_file, tmp_path, keyserver):
    moat, lic, doc = bundle(
        vendor, gguf_file, tmp_path / "out", machine, mode="lease", keyserver=keyserver.url, lease_ttl=4, grace=2, seats=2
    )
    lid = doc["license"]["id"]
    token = json.loads(cli("tokens", "create", "--name", "seats", "--json").stdout)["token"]
    ports = [free_port() for _ in range(3)]
    logs = [tmp_path / f"serve-{i}.log" for i in range(3)]
    procs, lb = [], None
    try:
        for i in range(3):  # one after the other, so which one is the third is known
            procs.append(_serve(moat, lic, ports[i], open(logs[i], "w")))
            _wait_status(ports[i], 200 if i < 2 else 503, procs[i], logs[i])
        probe = KeyServer(vendor)
        assert probe.live_leases(lid) == 2
        hdr = {"Authorization": f"Bearer {token}"}
        h = httpx.get(f"http://127.0.0.1:{ports[2]}/health", headers=hdr)
        assert h.status_code == 503
        reason = h.json()["reason"]
        assert reason.startswith("no license seat:") and f"all 2 seats of license {lid} are in use" in reason
        assert "\n" not in reason
        assert reason in logs[2].read_text()  # the same one line in the replica's log
        r = httpx.post(
            f"http://127.0.0.1:{ports[2]}/v1/completions", headers=hdr, json={"model": h.json()["model"], "prompt": "x"}
        )
        assert r.status_code == 503 and "no license seat" in r.json()["error"]["message"]
        for i in (0, 1):  # the two with seats serve
            assert httpx.get(f"http://127.0.0.1:{ports[i]}/health").status_code == 200
        # HAProxy (deploy/haproxy.cfg) in front of the second and the third: its health check on /health
        # (readiness, not /livez) keeps editors off the replica without a seat
        if haproxy_bin() is not None:
            lb = HAProxy.start(tmp_path / "haproxy.log", f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[2]}")
            lb.wait_state("replica2", "DOWN")
            body = {"model": h.json()["model"], "prompt": "x = ", "max_tokens": 2}
            for _ in range(6):
                r = httpx.post(lb.url + "/v1/completions", headers=hdr, json=body, timeout=60)
                assert r.status_code == 200 and r.headers["x-codemoat-replica"] == "replica1", r.text
        # a clean stop gives the seat back; the third takes it at its next attempt (every second here)
        procs[0].terminate()
        procs[0].wait(timeout=30)
        _wait_status(ports[2], 200, procs[2], logs[2], timeout=30)
        assert probe.live_leases(lid) == 2
        assert httpx.get(f"http://127.0.0.1:{ports[2]}/health", headers=hdr).json()["license"]["seats_used"] == 2
        if lb is not None:  # and HAProxy sends it editors again, no reload
            lb.wait_state("replica2", "UP")
            seen = {
                httpx.post(lb.url + "/v1/completions", headers=hdr, json=body, timeout=60).headers["x-codemoat-replica"]
                for _ in range(8)
            }
            assert seen == {"replica1", "replica2"}
    finally:
        if lb is not None:
            lb.stop()
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
