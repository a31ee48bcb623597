"""Attacks on per-instance license seats by someone who holds the machine key (the customer's admin
or a local user on a replica host) but not a serving process's in-memory instance key: turning a
captured, undelivered request into the other kind, replaying a release, re-signing a request on
another licensed machine, and two key-server processes on one database racing for the last seat."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from codemoat.vault.codec import b64e, sign
from codemoat.vault.keyserver import RELEASE_DOMAIN, REQUEST_DOMAIN, KeyServer, LeaseDenied, request_message
from codemoat.vault.lease import LeaseClient, outbound_path
from codemoat.vault.license import License
from codemoat.vault.machine import MachineKey
from vaulthelp import bundle


def _license(vendor, model, tmp_path, machines, url, seats=1):
    _, lic, _ = bundle(vendor, model, tmp_path / "out", machines, mode="lease", keyserver=url, seats=seats, lease_ttl=600)
    return License.load(lic)


def _resigned(req: dict, machine: MachineKey, domain: bytes) -> dict:
    """`req` with its machine signature made again under `domain` (what the machine key's holder can do)."""
    forged = dict(req)
    forged["signature"] = b64e(sign(machine.ed25519, domain, request_message(forged)))
    return forged


def test_a_held_back_renewal_cannot_be_turned_into_a_release_of_that_seat(vendor, machine, model, tmp_path, keyserver):
    lic = _license(vendor, model, tmp_path, machine, keyserver.url)
    a = LeaseClient(lic, machine)
    a.acquire()
    # A's next renewal, logged in outbound.jsonl and held back on the way (never reaches the server):
    # its nonce is still outstanding and it carries A's instance signature.
    held = a._signed_request(a._next_nonce, REQUEST_DOMAIN)
    r = httpx.post(keyserver.url + "/v1/lease/release", json=_resigned(held, machine, RELEASE_DOMAIN))
    assert r.status_code == 401 and r.json()["error"]["code"] == "bad_signature"
    assert KeyServer(vendor).live_leases(lic.id) == 1  # A's seat is still A's
    a.close()


def test_a_held_back_release_cannot_be_turned_into_a_lease_for_that_instance(vendor, machine, model, tmp_path, keyserver):
    lic = _license(vendor, model, tmp_path, machine, keyserver.url)
    a = LeaseClient(lic, machine)
    a.acquire()
    held = a._signed_request(a._next_nonce, RELEASE_DOMAIN)  # A's release at shutdown, held back
    r = httpx.post(keyserver.url + "/v1/lease", json=_resigned(held, machine, REQUEST_DOMAIN))
    assert r.status_code == 401 and r.json()["error"]["code"] == "bad_signature"
    assert KeyServer(vendor).live_leases(lic.id) == 1
    a.release()  # the forgery did not spend A's nonce (signatures are checked first): A's release gives the seat back
    assert KeyServer(vendor).live_leases(lic.id) == 0
    a.close()


def test_a_replayed_release_does_not_free_the_seat_taken_again(vendor, machine, model, tmp_path, keyserver):
    lic = _license(vendor, model, tmp_path, machine, keyserver.url)
    a = LeaseClient(lic, machine)
    a.acquire()
    a.release()
    sent = [json.loads(x) for x in outbound_path().read_text().splitlines()]
    release_body = [x["body"] for x in sent if x["destination"].endswith("/release") and x["body"]][-1]
    a.acquire()  # the same process takes its seat again
    r = httpx.post(keyserver.url + "/v1/lease/release", content=release_body, headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "bad_nonce"
    assert KeyServer(vendor).live_leases(lic.id) == 1
    a.close()


def test_a_request_re_signed_on_another_licensed_machine_is_refused(vendor, machine, model, tmp_path, keyserver):
    other = MachineKey.generate()
    lic = _license(vendor, model, tmp_path, [machine, other], keyserver.url, seats=2)
    a = LeaseClient(lic, machine)
    a.acquire()
    held = a._signed_request(a._next_nonce, REQUEST_DOMAIN)
    moved = dict(held, machine_id=other.id)  # A's instance, claimed from the other machine
    r = httpx.post(keyserver.url + "/v1/lease", json=_resigned(moved, other, REQUEST_DOMAIN))
    assert r.status_code == 401 and r.json()["error"]["code"] == "bad_signature"
    assert a.acquire().seats_used == 1  # A renews its own seat (the forgery only spent a nonce)
    a.close()


def test_two_key_server_processes_on_one_postgresql_grant_the_last_seat_once(pg_cluster, model, tmp_path):
    from codemoat.vault.vendor import Vendor

    url = pg_cluster.new_database()
    Vendor.init(tmp_path / "vendor", database_url=url).close()
    v1, v2 = Vendor.open(tmp_path / "vendor"), Vendor.open(tmp_path / "vendor")  # two engines, two pools
    machines = [MachineKey.generate() for _ in range(6)]
    lic = _license(v1, model, tmp_path, machines, "http://127.0.0.1:9", seats=2)
    servers = [KeyServer(v1), KeyServer(v2)]  # each with its own in-process lock, as two processes
    for _ in range(3):
        clients = [LeaseClient(lic, m) for m in machines]
        reqs = []
        for i, c in enumerate(clients):
            ks = servers[i % 2]
            reqs.append((ks, c._signed_request(ks.challenge(lic.id)["nonce"], REQUEST_DOMAIN)))
        barrier, got, refused = threading.Barrier(len(reqs)), [], []

        def take(ks, req):
            barrier.wait()
            try:
                got.append(ks.lease(req)["lease"]["seats_used"])
            except LeaseDenied as e:
                refused.append(e.code)

        threads = [threading.Thread(target=take, args=r) for r in reqs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 2 and refused == ["seats_exhausted"] * 4
        assert servers[0].live_leases(lic.id) == 2
        for i, c in enumerate(clients):  # give the seats back for the next round
            ks = servers[i % 2]
            try:
                ks.release(c._signed_request(ks.challenge(lic.id)["nonce"], RELEASE_DOMAIN))
            finally:
                c.close()
        assert servers[1].live_leases(lic.id) == 0
    v1.close()
    v2.close()
    pg_cluster.drop_database(url)


def test_a_clean_stop_after_a_key_server_restart_still_gives_the_seat_back(vendor, machine, model, tmp_path, keyserver):
    lic = _license(vendor, model, tmp_path, machine, keyserver.url)
    a = LeaseClient(lic, machine)
    a.acquire()
    keyserver.stop()
    keyserver.start()  # a new key server process: the renewal nonce A holds is forgotten
    a.release()
    assert KeyServer(vendor).live_leases(lic.id) == 0  # not held on until its TTL runs out
    b = LeaseClient(lic, machine)
    assert b.acquire().seats_used == 1  # the replica that replaces A gets the seat at once
    a.close()
    b.close()


def test_a_replica_cut_off_from_the_key_server_keeps_its_seat_through_its_grace(vendor, machine, model, tmp_path):
    """The admin blocks replica A's renewals (a firewall rule): A serves on through its lease's TTL and
    then its grace, as in any outage. If its seat were free once the TTL ran out, a waiting replica B
    would take it and both would serve on one seat; repeated, N seats serve N + N·grace/TTL replicas."""
    from codemoat.vault.clock import ManualClock

    _, path, _ = bundle(
        vendor, model, tmp_path / "out", machine, mode="lease", keyserver="http://127.0.0.1:9", seats=1, lease_ttl=600, grace=300
    )
    lic = License.load(path)
    clock = ManualClock()
    ks = KeyServer(vendor, clock=clock)
    a, b = LeaseClient(lic, machine), LeaseClient(lic, machine)

    def take(c: LeaseClient) -> dict:
        return ks.lease(c._signed_request(ks.challenge(lic.id)["nonce"], REQUEST_DOMAIN))["lease"]

    take(a)
    clock.advance(601)  # A's lease ran out; it may still serve for its 300 s of grace
    with pytest.raises(LeaseDenied) as e:
        take(b)
    assert e.value.code == "seats_exhausted"
    assert take(a)["seats_used"] == 1  # A, heard from again within its grace, keeps its seat
    clock.advance(600 + 300 + 1)  # A gone for good (a crash): past TTL + grace its seat is free
    assert take(b)["seats_used"] == 1
    a.close()
    b.close()
