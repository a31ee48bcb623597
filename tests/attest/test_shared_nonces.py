"""Challenge nonces live in the vendor database: a challenge from one key server process is accepted
by another, once; a replayed or expired one is refused by every process (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading

import httpx
import pytest

from codemoat.vault.clock import ManualClock
from codemoat.vault.keyserver import NONCE_TTL, REQUEST_DOMAIN, KeyServer, LeaseDenied
from codemoat.vault.lease import LeaseClient
from codemoat.vault.license import License
from codemoat.vault.machine import MachineKey
from codemoat.vault.vendor import Vendor
from ggufs import write_gguf
from attest.tpmhelp import keyserver_process
from vault.vaulthelp import bundle


@pytest.fixture
def leased(database_url, tmp_path):
    """A vendor on `database_url`, a 4-seat lease license for this machine, and its client."""
    vendor = Vendor.init(tmp_path / "vendor", database_url=database_url)
    model = tmp_path / "m.gguf"
    write_gguf(model, 20_000)
    machine = MachineKey.load_or_create()
    _, lic_path, _ = bundle(vendor, model, tmp_path / "out", machine, mode="lease", keyserver="http://127.0.0.1:9", seats=4)
    client = LeaseClient(License.load(lic_path), machine)
    yield vendor, client
    client.close()
    vendor.close()


def _lease(url: str, req: dict) -> tuple[int, str | None]:
    r = httpx.post(url + "/v1/lease", json=req, timeout=30)
    return r.status_code, (r.json().get("error") or {}).get("code")


def _challenge(url: str, lid: str) -> str:
    return httpx.post(url + "/v1/lease/challenge", json={"license_id": lid}, timeout=30).json()["nonce"]


@pytest.mark.slow
def test_a_challenge_from_one_key_server_process_is_accepted_once_by_another(leased, tmp_path):
    vendor, client = leased
    lid = client.lic.id
    with (
        keyserver_process(tmp_path / "vendor", "--workers", "2") as url_a,  # itself two processes on one port
        keyserver_process(tmp_path / "vendor") as url_b,
    ):
        req = client._signed_request(_challenge(url_a, lid), REQUEST_DOMAIN)
        assert _lease(url_b, req) == (200, None)  # issued by A, spent at B
        for url in (url_a, url_b):  # a replay, at either
            assert _lease(url, req) == (401, "bad_nonce")
        # the same request sent to both at once, several times: exactly one lease each time
        for _ in range(4):
            req = client._signed_request(_challenge(url_b, lid), REQUEST_DOMAIN)
            got: list[tuple[int, str | None]] = []
            ts = [threading.Thread(target=lambda u=u: got.append(_lease(u, req))) for u in (url_a, url_b, url_a, url_b)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert sorted(got, key=str) == sorted([(200, None)] + [(401, "bad_nonce")] * 3, key=str), got
        # a nonce of another license is not this one's
        other = bundle(
            vendor,
            tmp_path / "m.gguf",
            tmp_path / "out2",
            client.machine,
            customer="bolt",
            mode="lease",
            keyserver="http://127.0.0.1:9",
        )[2]
        theirs = _challenge(url_a, other["license"]["id"])
        assert _lease(url_b, client._signed_request(theirs, REQUEST_DOMAIN)) == (401, "bad_nonce")
        # `--workers 2`: a fresh connection each time, so the two workers take turns at each step
        for _ in range(10):
            req = client._signed_request(_challenge(url_a, lid), REQUEST_DOMAIN)
            assert _lease(url_a, req) == (200, None)
            assert _lease(url_a, req) == (401, "bad_nonce")


def test_expired_and_replayed_challenges_are_refused_by_every_process(leased):
    vendor, client = leased
    lid = client.lic.id
    clock = ManualClock()
    one, two = KeyServer(vendor, clock), KeyServer(vendor, clock)  # two processes' state, one database

    def refused(ks: KeyServer, req: dict) -> str:
        with pytest.raises(LeaseDenied) as e:
            ks.lease(req)
        return e.value.code

    late = client._signed_request(one.challenge(lid)["nonce"], REQUEST_DOMAIN)
    fresh = client._signed_request(one.challenge(lid)["nonce"], REQUEST_DOMAIN)
    clock.advance(NONCE_TTL / 2)
    assert two.lease(fresh)["lease"]["ttl"] > 0
    assert refused(one, fresh) == "bad_nonce" and refused(two, fresh) == "bad_nonce"
    clock.advance(NONCE_TTL / 2 + 1)  # `late` was never used, but its minute is over
    assert refused(two, late) == "bad_nonce" and refused(one, late) == "bad_nonce"
    # a renewal nonce handed out by one process is good at the other, once
    nxt = two.lease(client._signed_request(two.challenge(lid)["nonce"], REQUEST_DOMAIN))["lease"]["next_nonce"]
    renewal = client._signed_request(nxt, REQUEST_DOMAIN)
    assert one.lease(renewal)["lease"]["ttl"] > 0
    assert refused(two, renewal) == "bad_nonce"
    # a refused lease (revoked) still spends its nonce: the same request is not answered twice
    req = client._signed_request(one.challenge(lid)["nonce"], REQUEST_DOMAIN)
    vendor.revoke(lid)
    assert refused(two, req) == "revoked"
    assert refused(one, req) == "bad_nonce"
