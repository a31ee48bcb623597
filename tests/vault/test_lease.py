"""Key leases against the real key server (uvicorn on 127.0.0.1): proof, signatures, replay, seats, outages."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from codemoat.vault.clock import ManualClock
from codemoat.vault.codec import VaultError, b64e
from codemoat.vault.keyserver import LeaseDenied
from codemoat.vault.lease import LeaseClient, Unreachable, outbound_path
from codemoat.vault.leasekeeper import LeaseKeeper
from codemoat.vault.license import License
from codemoat.vault.machine import MachineKey
from .conftest import KeyServerProcess
from vaulthelp import bundle


def lease_license(vendor, model, tmp_path, machines, url, **kw):
    kw.setdefault("lease_ttl", 10)
    kw.setdefault("grace", 5)
    moat, lic, doc = bundle(vendor, model, tmp_path / "out", machines, mode="lease", keyserver=url, **kw)
    return moat, License.load(lic), doc


def test_lease_round_trip_and_outbound_log(vendor, machine, model, tmp_path, keyserver):
    moat, lic, doc = lease_license(vendor, model, tmp_path, machine, keyserver.url)
    assert doc["license"]["keys"] is None  # no key in a lease license
    client = LeaseClient(lic, machine)
    lease = client.acquire()
    assert lease.content_key == vendor.content_key(doc["license"]["model"]["file_id"])
    assert lease.watermark_key == vendor.find_customer("acme").watermark_secret
    assert (lease.ttl, lease.grace, lease.seats_used) == (10, 5, 1)
    lines = [json.loads(l) for l in outbound_path().read_text().splitlines()]
    sent = [l for l in lines if l["body"] is not None]
    assert [l["destination"] for l in sent] == [keyserver.url + "/v1/lease/challenge", keyserver.url + "/v1/lease"]
    assert {l["status"] for l in lines if l["body"] is None} == {200}
    req = json.loads(sent[1]["body"])
    assert set(req) == {"license_id", "machine_id", "nonce", "client_time", "signature", "instance", "instance_signature"}
    # the log line was written before the request left: its id precedes its answer's
    assert [l["id"] for l in lines] == [sent[0]["id"], sent[0]["id"], sent[1]["id"], sent[1]["id"]]
    # a renewal is one round trip, on the nonce the last answer handed out
    client.acquire()
    lines = [json.loads(l) for l in outbound_path().read_text().splitlines()]
    assert len(lines) == 6 and lines[4]["destination"] == keyserver.url + "/v1/lease"
    assert json.loads(lines[4]["body"])["nonce"] != req["nonce"]
    # an operator's logrotate moves the file aside: the next request is on record in a new file at the path, and
    # the moved one keeps what it had (the writer held the old file open and wrote on into it, unseen)
    rotated = outbound_path().with_name("outbound.jsonl.1")
    outbound_path().rename(rotated)
    client.acquire()
    assert len(rotated.read_text().splitlines()) == 6
    assert [json.loads(l)["destination"] for l in outbound_path().read_text().splitlines()] == [keyserver.url + "/v1/lease"] * 2
    client.close()


def test_nonce_is_single_use_and_proof_required(vendor, machine, model, tmp_path, keyserver):
    _, lic, _ = lease_license(vendor, model, tmp_path, machine, keyserver.url)
    client = LeaseClient(lic, machine)
    nonce = httpx.post(keyserver.url + "/v1/lease/challenge", json={"license_id": lic.id}).json()["nonce"]
    from codemoat.vault.keyserver import REQUEST_DOMAIN

    req = client._signed_request(nonce, REQUEST_DOMAIN)
    assert httpx.post(keyserver.url + "/v1/lease", json=req).status_code == 200
    again = httpx.post(keyserver.url + "/v1/lease", json=req)  # a replayed request
    assert again.status_code == 401 and again.json()["error"]["code"] == "bad_nonce"
    # someone who knows the public identity but not the private key
    impostor = MachineKey(MachineKey.generate().x25519, MachineKey.generate().ed25519, machine.facts)
    fake = LeaseClient(lic, impostor)
    fake.machine = type("M", (), {"id": machine.id, "ed25519": impostor.ed25519})()
    nonce = httpx.post(keyserver.url + "/v1/lease/challenge", json={"license_id": lic.id}).json()["nonce"]
    r = httpx.post(keyserver.url + "/v1/lease", json=fake._signed_request(nonce, REQUEST_DOMAIN))
    assert r.status_code == 401 and r.json()["error"]["code"] == "bad_signature"
    client.close()


class Tamper(httpx.HTTPTransport):
    """A man in the middle on the wire: edits or replays the key server's answers."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode, self.saved = mode, None

    def handle_request(self, request):
        resp = super().handle_request(request)
        if not request.url.path.endswith("/v1/lease"):
            return resp
        resp.read()
        data = resp.json()
        if self.mode == "edit":
            data["lease"]["ttl"] = 10**6
        elif self.mode == "replay":
            if self.saved is None:
                self.saved = data
            data = self.saved
        return httpx.Response(resp.status_code, json=data)


def test_tampered_and_replayed_answers_rejected(vendor, machine, model, tmp_path, keyserver):
    # two clients, two seats: each client is its own instance (the edited answer's seat stays taken)
    _, lic, _ = lease_license(vendor, model, tmp_path, machine, keyserver.url, seats=2)
    with pytest.raises(VaultError, match="key server answer: bad signature"):
        LeaseClient(lic, machine, transport=Tamper("edit")).acquire()
    replay = LeaseClient(lic, machine, transport=Tamper("replay"))
    replay.acquire()
    with pytest.raises(VaultError, match="replayed"):
        replay.acquire()


def test_seats_never_exceed_n_under_concurrency(vendor, model, tmp_path, keyserver):
    machines = [MachineKey.generate() for _ in range(8)]
    _, lic, doc = lease_license(vendor, model, tmp_path, machines, keyserver.url, seats=3, lease_ttl=600)
    from codemoat.vault.keyserver import KeyServer

    probe = KeyServer(vendor)
    clients = {m.id: LeaseClient(lic, m) for m in machines}  # one serving process per machine, kept across rounds
    for round_ in range(3):
        barrier = threading.Barrier(len(machines))
        got: list[str] = []
        denied: list[str] = []

        def run(m: MachineKey) -> None:
            barrier.wait()
            try:
                clients[m.id].acquire()
                got.append(m.id)
            except LeaseDenied as e:
                denied.append(e.code)

        threads = [threading.Thread(target=run, args=(m,)) for m in machines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) <= 3 and probe.live_leases(lic.id) <= 3
        if round_ == 0:
            assert len(got) == 3 and denied == ["seats_exhausted"] * 5
            holders = set(got)
        else:
            assert set(got) == holders  # renewals by holders succeed; nobody else gets in
    assert probe.live_leases(lic.id) == 3
    for c in clients.values():
        c.close()


def test_keeper_outage_within_ttl_plus_grace(vendor, machine, model, tmp_path):
    ks = KeyServerProcess(vendor).start()
    try:
        _, lic, _ = lease_license(vendor, model, tmp_path, machine, ks.url, lease_ttl=10, grace=5)
        clock = ManualClock()
        client = LeaseClient(lic, machine, clock=clock)
        events: list[str] = []
        keeper = LeaseKeeper(
            client,
            client.acquire(),
            on_lost=lambda r: events.append("lost: " + r),
            on_regained=lambda l: events.append("regained"),
            clock=clock,
        )
        t0 = keeper.lease.sent_at
        clock.advance(5)
        keeper.tick()
        assert keeper.renewals == 1 and keeper.state == "held"  # renewed at half the TTL
        renewed = clock.time()
        d = keeper.describe()  # what /health and the console's Model page show
        assert (d["renewed_at"], d["next_renewal_in"], d["failures"]) == (renewed, 5.0, 0)
        assert d["key_server"] == client.destination and "/" not in d["key_server"]
        t0 = keeper.lease.sent_at
        ks.stop()
        for step in (5, 2, 2, 2, 2, 1.5):  # fails to renew from t0+5 on; deadline is t0+15
            clock.advance(step)
            keeper.tick()
        assert clock.monotonic() - t0 == pytest.approx(14.5)
        assert events == [] and keeper.state == "renewing"
        assert "unreachable" in keeper.last_error
        assert keeper.describe()["failures"] == 6 and keeper.describe()["renewed_at"] == renewed
        clock.advance(1.0)  # t0 + 15.5: past expiry + grace
        keeper.tick()
        assert keeper.state == "lost" and len(events) == 1 and "could not be renewed" in events[0]
        ks.start()
        clock.advance(keeper.next_attempt - clock.monotonic())
        keeper.tick()
        assert events[-1] == "regained" and keeper.state == "held"
        assert keeper.describe()["failures"] == 0 and keeper.describe()["renewed_at"] == clock.time()
    finally:
        ks.stop()


def test_revoke_stops_at_next_renewal(vendor, machine, model, tmp_path, keyserver):
    _, lic, _ = lease_license(vendor, model, tmp_path, machine, keyserver.url, lease_ttl=60, grace=600)
    clock = ManualClock()
    client = LeaseClient(lic, machine, clock=clock)
    events: list[str] = []
    keeper = LeaseKeeper(client, client.acquire(), on_lost=events.append, on_regained=lambda l: None, clock=clock)
    vendor.revoke(lic.id)
    clock.advance(29)
    keeper.tick()
    assert events == []  # not yet due
    clock.advance(1)
    keeper.tick()  # the renewal at half the TTL is refused: lost at once, grace does not apply
    assert keeper.state == "revoked" and "revoked" in events[0]
    with pytest.raises(LeaseDenied, match="revoked"):
        client.acquire()


def test_unreachable_key_server(vendor, machine, model, tmp_path):
    from conftest import free_port

    _, lic, _ = lease_license(vendor, model, tmp_path, machine, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(Unreachable, match="key server unreachable"):
        LeaseClient(lic, machine).acquire()
    lines = outbound_path().read_text().splitlines()
    sent = json.loads(json.loads(lines[0])["body"])
    assert sent["license_id"] == lic.id and set(sent) == {"license_id", "client_nonce"}
    assert json.loads(lines[1])["status"] == 0


def test_expired_license_gets_no_lease(vendor, machine, model, tmp_path):
    clock = ManualClock()
    ks = KeyServerProcess(vendor, clock=clock).start()
    try:
        _, lic, _ = lease_license(vendor, model, tmp_path, machine, ks.url)
        clock.advance(31 * 86400)
        with pytest.raises(LeaseDenied, match="expired") as e:
            LeaseClient(lic, machine).acquire()
        assert e.value.code == "expired"
    finally:
        ks.stop()


def test_lease_license_names_several_machines_but_unknown_one_refused(vendor, machine, model, tmp_path, keyserver):
    _, lic, _ = lease_license(vendor, model, tmp_path, [machine, MachineKey.generate()], keyserver.url, seats=1)
    stranger = MachineKey.generate()
    with pytest.raises(LeaseDenied, match="does not name machine"):
        LeaseClient(lic, stranger).acquire()
    assert b64e(stranger.x25519_public) not in json.dumps(lic.raw)


def test_cli_lease_failures_are_one_line(vendor, machine, model, tmp_path):
    from conftest import free_port
    from vaulthelp import cli, one_line_error

    ks = KeyServerProcess(vendor).start()
    other = MachineKey.generate()
    try:
        moat, lic, doc = bundle(
            vendor, model, tmp_path / "out", [machine, other], mode="lease", keyserver=ks.url, lease_ttl=600, grace=60, seats=1
        )
        p = cli("verify", "--model", str(moat), "--license", str(lic), "--json")
        assert p.returncode == 0 and "lease from" in json.loads(p.stdout)["checks"][-2]
        LeaseClient(License.load(lic), other).acquire()  # the one seat is now held by the other machine
        assert "all 1 seats" in one_line_error(cli("verify", "--model", str(moat), "--license", str(lic)))
        vendor.revoke(doc["license"]["id"])
        assert "revoked" in one_line_error(cli("verify", "--model", str(moat), "--license", str(lic)))
    finally:
        ks.stop()
    assert "key server unreachable" in one_line_error(cli("verify", "--model", str(moat), "--license", str(lic)))
    moat2, lic2, _ = bundle(vendor, model, tmp_path / "out2", machine, mode="lease", keyserver=f"http://127.0.0.1:{free_port()}")
    assert "key server unreachable" in one_line_error(cli("verify", "--model", str(moat2), "--license", str(lic2)))


def test_release_frees_the_seat(vendor, machine, model, tmp_path, keyserver):
    other = MachineKey.generate()
    _, lic, _ = lease_license(vendor, model, tmp_path, [machine, other], keyserver.url, seats=1, lease_ttl=600)
    a, b = LeaseClient(lic, machine), LeaseClient(lic, other)
    a.acquire()
    with pytest.raises(LeaseDenied, match="seats"):
        b.acquire()
    a.release()
    assert b.acquire().seats_used == 1
    with pytest.raises(LeaseDenied, match="seats"):
        a.acquire()
    a.close()
    b.close()
