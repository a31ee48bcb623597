"""The key server under attack: forged and replayed refusals through an on-path proxy, oversized and
deeply nested bodies, challenges for licenses it does not know, a flood of challenges."""

from __future__ import annotations

import json

import httpx
import pytest

from codemoat.vault import keyserver as ks_mod
from codemoat.vault import nonces as nonces_mod
from codemoat.vault.clock import ManualClock
from codemoat.vault.codec import b64d, canonical, ed_public, verify
from codemoat.vault.keyserver import REFUSAL_DOMAIN, KeyServer, LeaseDenied
from codemoat.vault.lease import LeaseClient, Unreachable
from codemoat.vault.leasekeeper import LeaseKeeper
from codemoat.vault.license import License
from codemoat.vault.machine import MachineKey
from proxy import RewritingProxy
from tarpit import Tarpit, bounded
from vaulthelp import bundle

FORGED = json.dumps({"error": {"code": "revoked", "message": "license was revoked"}}).encode()


@pytest.fixture
def proxied(keyserver):
    """A proxy in front of the real key server; `mode["answer"]` replaces /v1/lease answers when set."""
    mode: dict = {"answer": None}

    def rewrite(path, status, body):
        if path == "/v1/lease" and mode["answer"] is not None:
            return mode["answer"]
        return status, body

    p = RewritingProxy(keyserver.url, rewrite).start()
    p.mode = mode
    yield p
    p.stop()


def _license(vendor, model, out, machine, url, **kw):
    kw.setdefault("lease_ttl", 10)
    kw.setdefault("grace", 5)
    _, lic, _ = bundle(vendor, model, out, machine, mode="lease", keyserver=url, **kw)
    return License.load(lic)


def _keeper(lic, machine, clock, events):
    client = LeaseClient(lic, machine, clock=clock)
    return LeaseKeeper(
        client,
        client.acquire(),
        on_lost=lambda r: events.append("lost: " + r),
        on_regained=lambda l: events.append("regained"),
        clock=clock,
    )


def test_a_forged_revoked_answer_is_an_outage_not_a_revocation(vendor, machine, model, tmp_path, proxied):
    lic = _license(vendor, model, tmp_path / "a", machine, proxied.url)
    clock, events = ManualClock(), []
    keeper = _keeper(lic, machine, clock, events)
    t0 = keeper.lease.sent_at
    proxied.mode["answer"] = (403, FORGED)  # the proxy now answers every renewal "revoked", unsigned
    clock.advance(5)
    keeper.tick()
    assert keeper.state == "renewing" and events == []  # not unloaded: serving on through TTL + grace
    assert "without a valid signature" in keeper.last_error
    for _ in range(9):
        clock.advance(1)
        keeper.tick()
    assert clock.monotonic() - t0 == 14 and events == []
    clock.advance(1.5)  # past TTL + grace: lost as in any outage, never "revoked"
    keeper.tick()
    assert keeper.state == "lost" and len(events) == 1 and "could not be renewed" in events[0]
    with pytest.raises(Unreachable):
        LeaseClient(lic, machine).acquire()
    # a forged refusal carrying a signature made with another key is no better
    other = KeyServer(type(vendor).init(tmp_path / "other-vendor"))
    forged = other.refusal(LeaseDenied("revoked", "license was revoked"), {"license_id": lic.id})
    proxied.mode["answer"] = (403, json.dumps(forged).encode())
    with pytest.raises(Unreachable, match="without a valid signature"):
        LeaseClient(lic, machine).acquire()
    proxied.mode["answer"] = None  # the real server answers again: the lease comes back
    clock.advance(keeper.next_attempt - clock.monotonic())
    keeper.tick()
    assert keeper.state == "held" and events[-1] == "regained"


@pytest.mark.parametrize(
    "answer,why",
    [
        (b"[" * 100_000, "without JSON"),
        (b'{"lease": ' * 5_000, "without JSON"),
        (b'{"lease": {"ttl": NaN}, "signature": "AAAA"}', "Out of range float"),
    ],
    ids=["array", "object", "nan"],
)
def test_an_answer_the_decoder_or_canonical_json_refuses_is_an_outage_that_ends_at_ttl_plus_grace(
    vendor, machine, model, tmp_path, proxied, answer, why
):
    """The customer's own proxy answers every renewal with JSON nested deeper than the decoder goes, or with a
    'lease' holding NaN (which json.loads takes and canonical() refuses with a ValueError). Neither raised
    the VaultError tick() counts as a failed renewal; each went up to the keeper thread's catch-all, which
    noted it and looped: the state stayed "held", the TTL + grace deadline was never checked, and the
    model served on for good after its lease ran out (a revoked license too: its refusal never got through)."""
    lic = _license(vendor, model, tmp_path / "a", machine, proxied.url)
    clock, events = ManualClock(), []
    keeper = _keeper(lic, machine, clock, events)
    proxied.mode["answer"] = (200, answer)
    clock.advance(5)
    keeper.tick()
    assert keeper.state == "renewing" and events == [] and why in keeper.last_error
    clock.advance(10.5)  # past TTL + grace
    keeper.tick()
    assert keeper.state == "lost" and len(events) == 1 and "could not be renewed" in events[0]


def _tick(keeper) -> None:
    """keeper.tick() as its thread runs it; fails the test when it is still blocked after 30 s."""
    bounded(keeper.tick, "the lease keeper is still waiting on the answer: its deadline is never checked")


def test_an_answer_that_never_ends_is_an_outage_that_ends_at_ttl_plus_grace(vendor, machine, model, tmp_path, keyserver):
    """httpx's timeout bounds each read, not the answer: the customer's own proxy sending one byte every 0.05 s
    held LeaseKeeper.tick in the renewal for good, so the state stayed "held", the TTL + grace deadline was
    never checked, and the model served on after its lease ran out (or its license was revoked)."""
    tarpit = Tarpit(keyserver.url).start()
    try:
        lic = _license(vendor, model, tmp_path / "a", machine, tarpit.url)
        clock, events = ManualClock(), []
        client = LeaseClient(lic, machine, clock=clock, timeout=2)
        keeper = LeaseKeeper(
            client, client.acquire(), on_lost=lambda r: events.append("lost: " + r), on_regained=print, clock=clock
        )
        tarpit.on = True
        clock.advance(5)
        _tick(keeper)
        assert keeper.state == "renewing" and events == [] and "no complete answer" in keeper.last_error
        clock.advance(10.5)  # past TTL + grace
        _tick(keeper)
        assert keeper.state == "lost" and len(events) == 1 and "could not be renewed" in events[0]
    finally:
        tarpit.stop()


def test_a_genuine_revocation_through_the_proxy_still_ends_serving_at_once(vendor, machine, model, tmp_path, proxied):
    lic = _license(vendor, model, tmp_path / "a", machine, proxied.url, lease_ttl=60, grace=600)
    clock, events = ManualClock(), []
    keeper = _keeper(lic, machine, clock, events)
    vendor.revoke(lic.id)
    clock.advance(30)
    keeper.tick()
    assert keeper.state == "revoked" and "revoked" in events[0]
    path, status, body = proxied.seen[-1]
    refusal = json.loads(body)  # what the key server said: signed, and bound to this machine's request
    assert status == 403 and refusal["error"]["code"] == "revoked" and refusal["error"]["machine_id"] == machine.id
    verify(ed_public(lic.lease["server_key"], "k"), b64d(refusal["signature"]), REFUSAL_DOMAIN, canonical(refusal["error"]), "r")


def test_a_genuine_refusal_replayed_to_another_request_is_an_outage(vendor, machine, model, tmp_path, proxied):
    revoked = _license(vendor, model, tmp_path / "a", machine, proxied.url, customer="acme")
    live = _license(vendor, model, tmp_path / "b", machine, proxied.url, customer="bolt")
    vendor.revoke(revoked.id)
    with pytest.raises(LeaseDenied, match="revoked"):
        LeaseClient(revoked, machine).acquire()
    genuine = proxied.seen[-1]
    assert genuine[1] == 403 and json.loads(genuine[2])["error"]["code"] == "revoked"
    with pytest.raises(LeaseDenied, match="revoked"):  # the same license again: a fresh nonce, a fresh refusal
        LeaseClient(revoked, machine).acquire()
    proxied.mode["answer"] = genuine[1:]
    with pytest.raises(Unreachable):  # another license's signed refusal
        LeaseClient(live, machine).acquire()
    with pytest.raises(Unreachable):  # its own license, but an earlier request's nonce
        LeaseClient(revoked, machine).acquire()


def test_challenge_for_an_unknown_license_is_a_signed_refusal_and_keeps_no_state(vendor, keyserver):
    app_ks: KeyServer = keyserver.server.config.app.state.keyserver
    r = httpx.post(keyserver.url + "/v1/lease/challenge", json={"license_id": "lic_" + "x" * 100, "client_nonce": "n1"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_license"
    err = r.json()["error"]
    assert err["nonce"] == "n1"
    verify(ed_public(vendor.keyserver_key_b64, "k"), b64d(r.json()["signature"]), REFUSAL_DOMAIN, canonical(err), "r")
    assert app_ks.nonces.count() == 0
    big = httpx.post(
        keyserver.url + "/v1/lease/challenge",
        content=json.dumps({"license_id": "x" * (1 << 20)}),
        headers={"content-type": "application/json"},
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
    assert app_ks.nonces.count() == 0


def test_oversized_and_deeply_nested_bodies_are_refused_cleanly(keyserver):
    for path in ("/v1/lease/challenge", "/v1/lease", "/v1/lease/release"):
        deep = "[" * 5000 + "]" * 5000
        r = httpx.post(keyserver.url + path, content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "nested" in r.json()["error"]["message"], (path, r.text)
        r = httpx.post(keyserver.url + path, content='{"license_id": ' + "[" * 3000 + "]" * 3000 + "}")
        assert r.status_code == 400
        r = httpx.post(keyserver.url + path, content=b"{" + b" " * (1 << 20) + b"}")
        assert r.status_code == 413

        def chunked():  # no Content-Length: counted as it arrives
            for _ in range(64):
                yield b" " * 4096

        r = httpx.post(keyserver.url + path, content=chunked())
        assert r.status_code == 413
        r = httpx.post(keyserver.url + path, content=b"not json")
        assert r.status_code == 400
    assert httpx.get(keyserver.url + "/health").status_code == 200
    ok = httpx.post(keyserver.url + "/v1/lease/challenge", json={"license_id": '[[{"}]]'})  # brackets in a string
    assert ok.status_code == 404


def test_challenges_keep_no_table_and_spent_nonces_are_swept_once_expired(vendor, machine, model, tmp_path, monkeypatch):
    """Was: outstanding challenges were rows, the soonest to expire evicted past a cap, so a flood of challenges
    for a known license id evicted every genuine client's (tests/vault/test_challenge_flood.py). Now a challenge
    writes nothing, and a spent nonce's row goes once the nonce has expired (and the skew margin passed)."""
    lic = _license(vendor, model, tmp_path / "a", machine, "http://127.0.0.1:9")
    clock = ManualClock()
    server = KeyServer(vendor, clock)
    client = LeaseClient(lic, machine, clock=clock)
    monkeypatch.setattr(nonces_mod, "SWEEP_EVERY", 1)  # a sweep at every spend (one in 256 when serving)
    nonces = [server.challenge(lic.id)["nonce"] for _ in range(20)]
    assert server.nonces.count() == 0  # twenty challenges, no row
    server.lease(client._signed_request(nonces[0], ks_mod.REQUEST_DOMAIN))  # the oldest still works
    assert server.nonces.count() == 1  # its spend
    clock.advance(ks_mod.NONCE_TTL + 1)
    server.lease(client._signed_request(server.challenge(lic.id)["nonce"], ks_mod.REQUEST_DOMAIN))
    assert server.nonces.count() == 2  # expired, but kept for the clocks' skew (nonces.SKEW_S)
    clock.advance(nonces_mod.SKEW_S + ks_mod.NONCE_TTL)
    server.lease(client._signed_request(server.challenge(lic.id)["nonce"], ks_mod.REQUEST_DOMAIN))
    assert server.nonces.count() == 1  # the old spends are gone, the new one kept
    with pytest.raises(LeaseDenied, match="nonce is unknown"), vendor.engine.begin() as c:
        server._spend_nonce(c, nonces[-1], lic.id)  # expired, never spent
    with pytest.raises(LeaseDenied, match="no license"):
        server.challenge("lic_unknown")
    client.close()


def test_a_machine_not_on_the_license_gets_a_signed_refusal(vendor, machine, model, tmp_path, keyserver):
    lic = _license(vendor, model, tmp_path / "a", machine, keyserver.url)
    with pytest.raises(LeaseDenied, match="does not name machine") as e:
        LeaseClient(lic, MachineKey.generate()).acquire()
    assert e.value.code == "wrong_machine"


def test_depth_counts_brackets_outside_strings_only():
    from codemoat.serve.keyserver_app import MAX_DEPTH, too_deep

    assert not too_deep(b'{"a": "' + b"[" * 50 + b'"}')
    assert not too_deep(b'{"a": "\\"' + b"{" * 50 + b'"}')  # an escaped quote does not end the string
    assert not too_deep(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)
    assert too_deep(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1))
    assert too_deep(b'{"a": "x", "b": ' + b"[" * 20 + b"]" * 20 + b"}")


def _acquired(client: LeaseClient):
    """client.acquire() before the tarpit is on, tried again while a loaded machine keeps the key server's answer
    past the client's short read timeout (a retry takes the same seat: one per machine and instance)."""
    import time

    end = time.monotonic() + 60
    while True:
        try:
            return client.acquire()
        except Unreachable:
            if time.monotonic() > end:
                raise


def test_a_release_into_a_tarpit_does_not_hold_the_shutdown(vendor, machine, model, tmp_path, keyserver, caplog):
    """LeaseKeeper.stop(release=True) sent the release through httpx's per-read timeout only: a proxy dripping one
    byte every 0.05 s held serve's shutdown for good (a service manager then kills it, and no shutdown is audited).
    The release now gives up after 6 times the client's timeout, says so in one line, and the key server still
    ends the unreleased lease at its TTL."""
    tarpit = Tarpit(keyserver.url).start()
    try:
        lic = _license(vendor, model, tmp_path / "a", machine, tarpit.url)
        client = LeaseClient(lic, machine, timeout=0.5)
        keeper = LeaseKeeper(client, _acquired(client), on_lost=print, on_regained=print)
        probe = KeyServer(vendor, clock=ManualClock())
        assert probe.live_leases(lic.id) == 1
        tarpit.on = True
        bounded(lambda: keeper.stop(release=True), "the release into the tarpit still holds the shutdown")
        assert [r.getMessage() for r in caplog.records if "release abandoned" in r.getMessage()]
        assert probe.live_leases(lic.id) == 1  # not released: the key server ends it at its TTL
        probe.clock.advance(lic.lease["ttl"] + 1)
        assert probe.live_leases(lic.id) == 0
    finally:
        tarpit.stop()


def test_a_tarpit_at_start_is_a_one_line_refusal_not_a_start_that_never_ends(
    vendor, machine, model, tmp_path, keyserver, monkeypatch
):
    """serve's start asked for its first lease through httpx's per-read timeout only: a proxy dripping one byte
    every 0.05 s held open_sealed (so `codemoat serve`) for good. It is now `Unreachable` after 6 times the
    client's timeout (vault.keyserver_timeout_s), the one-line refusal a key server that is down gets."""
    from codemoat.config import load_settings
    from codemoat.engines.sealed import open_sealed

    monkeypatch.setenv("CODEMOAT_VAULT__KEYSERVER_TIMEOUT_S", "0.5")
    tarpit = Tarpit(keyserver.url).start()
    tarpit.on = True
    try:
        moat, lic, _ = bundle(vendor, model, tmp_path / "a", machine, mode="lease", keyserver=tarpit.url)
        e = bounded(
            lambda: open_sealed(moat, lic, settings=load_settings(), watch=False),
            "the start still waits on the key server's answer",
        )
        assert isinstance(e, Unreachable) and "no complete answer in 3 s" in str(e), e
    finally:
        tarpit.stop()
