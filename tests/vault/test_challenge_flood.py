"""A stranger who knows a license id (it is printed on the license) against the key server's challenge nonces.

Was broken: outstanding nonces were rows of the vendor database, at most 100,000, the soonest to expire
evicted first; a loop of challenges for the license id evicted every genuine client's pending nonce, so
its renewals failed and, after the grace, it stopped serving (and the flood filled the table). Now a
nonce is stateless (its license binding and expiry under a MAC of the key server's key): a challenge
writes nothing, and a spent nonce is a row, inserted once across key server processes and only after
the request's signature held. Each test runs on SQLite and on a real PostgreSQL.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from codemoat.vault.clock import ManualClock
from codemoat.vault.codec import b64d, b64e, sign
from codemoat.vault.keyserver import NONCE_TTL, REQUEST_DOMAIN, KeyServer, LeaseDenied, request_message
from codemoat.vault.lease import LeaseClient, Unreachable
from codemoat.vault.license import License
from codemoat.vault.machine import MachineKey
from codemoat.vault.vendor import Vendor
from proxy import RewritingProxy
from vaulthelp import bundle

from .conftest import KeyServerProcess


def _lease_license(vendor, model, out, machine, customer="acme"):
    _, path, _ = bundle(vendor, model, out, machine, customer=customer, mode="lease", keyserver="http://127.0.0.1:9", seats=4)
    return License.load(path)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, home, monkeypatch) -> Iterator[str]:
    """tests/conftest.py's, with the session's PostgreSQL cluster made outside this test's folder (the vault's
    autouse fixture points TMPDIR into it, where the postgres user cannot enter, and the cluster outlives it)."""
    if request.param == "sqlite":
        yield f"sqlite:///{home / 'codemoat.db'}"
        return
    with monkeypatch.context() as m:
        m.setattr(tempfile, "tempdir", None)
        m.delenv("TMPDIR", raising=False)
        cluster = request.getfixturevalue("pg_cluster")
    url = cluster.new_database()
    yield url
    cluster.drop_database(url)


@pytest.fixture
def leased(database_url, model, tmp_path):
    """A vendor on `database_url`, a lease license for this machine, and its client."""
    vendor = Vendor.init(tmp_path / "vendor", database_url=database_url)
    machine = MachineKey.load_or_create()
    client = LeaseClient(_lease_license(vendor, model, tmp_path / "out", machine), machine)
    yield vendor, client
    client.close()
    vendor.close()


def _rows(engine) -> dict[str, int]:
    """Every table's row count: what a flood would have to grow."""
    with engine.connect() as c:
        return {t: c.execute(sa.text(f'SELECT count(*) FROM "{t}"')).scalar_one() for t in sa.inspect(engine).get_table_names()}


@contextlib.contextmanager
def _serving(vendor) -> Iterator[str]:
    """The real key server app for `vendor` on a free 127.0.0.1 port: its URL."""
    ks = KeyServerProcess(vendor).start()
    try:
        yield ks.url
    finally:
        ks.stop()


def _lease(ks: KeyServer, client: LeaseClient, nonce: str) -> dict:
    return ks.lease(client._signed_request(nonce, REQUEST_DOMAIN))


def _refused(ks: KeyServer, client: LeaseClient, nonce: str) -> str:
    with pytest.raises(LeaseDenied) as e:
        _lease(ks, client, nonce)
    return e.value.code


def test_a_flood_of_challenges_writes_nothing_and_evicts_no_genuine_challenge(leased):
    vendor, client = leased
    ks = KeyServer(vendor)
    lid = client.lic.id
    genuine = ks.challenge(lid, "mine")["nonce"]
    before = _rows(vendor.engine)
    flood = {ks.challenge(lid, f"x{i}")["nonce"] for i in range(3000)}
    assert len(flood) == 3000 and genuine not in flood
    assert _rows(vendor.engine) == before  # not one row, however many: nothing to evict, nothing to fill
    with _serving(vendor) as url:  # the same over HTTP
        for i in range(50):
            r = httpx.post(url + "/v1/lease/challenge", json={"license_id": lid, "client_nonce": f"h{i}"})
            assert r.status_code == 200
    assert _rows(vendor.engine) == before
    assert "lease" in _lease(ks, client, genuine)  # the genuine client's challenge still works
    assert ks.nonces.count() == 1  # its spend is the one row


def test_a_nonce_is_accepted_once_by_any_key_server_on_the_database(leased, tmp_path):
    vendor, client = leased
    other = Vendor.open(tmp_path / "vendor")  # a second key server: its own keys loaded, its own memory
    try:
        with _serving(vendor) as url_a, _serving(other) as url_b:
            ans = httpx.post(url_a + "/v1/lease/challenge", json={"license_id": client.lic.id, "client_nonce": "c"}).json()
            req = client._signed_request(ans["nonce"], REQUEST_DOMAIN)
            assert httpx.post(url_b + "/v1/lease", json=req).status_code == 200  # issued by A, spent at B
            for url in (url_b, url_a):  # replayed at either
                r = httpx.post(url + "/v1/lease", json=req)
                assert (r.status_code, r.json()["error"]["code"]) == (401, "bad_nonce")
        ks = KeyServer(other)  # a fresh process's memory: only the database refuses it
        assert _refused(ks, client, req["nonce"]) == "bad_nonce"
    finally:
        other.close()


def test_a_renewal_nonce_works_once_and_until_it_expires(leased):
    vendor, client = leased
    clock = ManualClock()
    ks = KeyServer(vendor, clock)
    first = _lease(ks, client, ks.challenge(client.lic.id, "c")["nonce"])["lease"]
    second = _lease(ks, client, first["next_nonce"])["lease"]  # one round trip a heartbeat, as before
    assert _refused(ks, client, first["next_nonce"]) == "bad_nonce"
    clock.advance(second["ttl"] + second["grace"] + NONCE_TTL - 1)
    assert "lease" in _lease(ks, client, second["next_nonce"])  # still within its life
    late = ks.challenge(client.lic.id, "c")["nonce"]
    clock.advance(NONCE_TTL + 0.001)
    assert _refused(ks, client, late) == "bad_nonce"  # expired, never spent
    assert "lease" in _lease(ks, client, ks.challenge(client.lic.id, "c")["nonce"])  # a fresh one works


def test_a_nonce_is_its_own_license_s_only(leased, model, tmp_path):
    vendor, client = leased
    ks = KeyServer(vendor)
    other = LeaseClient(_lease_license(vendor, model, tmp_path / "out2", client.machine, customer="bolt"), client.machine)
    try:
        theirs = ks.challenge(other.lic.id, "c")["nonce"]
        assert _refused(ks, client, theirs) == "bad_nonce"  # issued for license B, sent for A
        assert "lease" in _lease(ks, other, ks.challenge(other.lic.id, "c")["nonce"])
        assert "lease" in _lease(ks, client, ks.challenge(client.lic.id, "c")["nonce"])
    finally:
        other.close()


def _flip(nonce: str, at: int) -> str:
    raw = bytearray(b64d(nonce))
    raw[at] ^= 0x01
    return b64e(bytes(raw))


def test_a_forged_or_edited_nonce_is_refused(leased, tmp_path):
    vendor, client = leased
    ks = KeyServer(vendor)
    lid = client.lic.id
    nonce = ks.challenge(lid, "c")["nonce"]
    assert len(nonce) == 64 and len(b64d(nonce)) == 48  # fits the String(64) spent key
    for at in (0, 1, 8, 9, 23, 24, 47):  # the version; the first and last byte of expiry, random part and tag
        assert _refused(ks, client, _flip(nonce, at)) == "bad_nonce", at
    foreign = Vendor.init(tmp_path / "other-vendor")  # another vendor's key server: another MAC key
    try:
        assert _refused(ks, client, KeyServer(foreign).nonces.issue(lid, NONCE_TTL)) == "bad_nonce"
    finally:
        foreign.close()
    for bad in (b64e(b"\x00" * 32), b64e(b"\x01" * 48), nonce[:-4], nonce + "AAAA"):  # old format, zeros, cut, grown
        assert _refused(ks, client, bad) == "bad_nonce"
    assert ks.nonces.count() == 0  # refused nonces leave no row
    assert "lease" in _lease(ks, client, nonce)  # the genuine one, untouched by all that


def test_a_bogus_lease_request_neither_spends_a_nonce_nor_adds_a_row(leased):
    vendor, client = leased
    ks = KeyServer(vendor)
    nonce = ks.challenge(client.lic.id, "c")["nonce"]
    for _ in range(20):  # a flood of lease requests over a genuine nonce, not signed by the licensed machine
        req = {"license_id": client.lic.id, "machine_id": client.machine.id, "nonce": nonce, "client_time": 1}
        req["signature"] = b64e(sign(_stranger_key(), REQUEST_DOMAIN, request_message(req)))
        with pytest.raises(LeaseDenied, match="not signed"):
            ks.lease(req)
    assert ks.nonces.count() == 0
    assert "lease" in _lease(ks, client, nonce)
    assert ks.nonces.count() == 1


def _stranger_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()  # a key no license names


def test_a_challenge_for_another_client_nonce_is_refused_by_the_client(leased):
    vendor, client = leased
    with _serving(vendor) as url:
        kept = httpx.post(url + "/v1/lease/challenge", json={"license_id": client.lic.id, "client_nonce": "X"}).content

        def swap(path, status, body):  # a proxy handing out a challenge answered for client nonce X
            return (status, kept) if path == "/v1/lease/challenge" else (status, body)

        proxy = RewritingProxy(url, swap).start()
        try:
            client.url = proxy.url
            with pytest.raises(Unreachable):
                client.acquire()
        finally:
            proxy.stop()
        client.url = url
        assert client.acquire().ttl > 0  # its own challenge, answered for its own client nonce


@pytest.mark.parametrize("bad", [True, False, "1", 1.5, None, [1], {"t": 1}])
def test_client_time_must_be_an_integer(leased, bad):
    vendor, client = leased
    ks = KeyServer(vendor)
    nonce = ks.challenge(client.lic.id, "c")["nonce"]
    req = {"license_id": client.lic.id, "machine_id": client.machine.id, "nonce": nonce, "client_time": bad}
    req["signature"] = b64e(sign(client.machine.ed25519, REQUEST_DOMAIN, request_message(req)))
    with pytest.raises(LeaseDenied) as e:
        ks.lease(req)
    assert (e.value.code, e.value.status) == ("bad_request", 400)
    req["client_time"] = 7
    req["signature"] = b64e(sign(client.machine.ed25519, REQUEST_DOMAIN, request_message(req)))
    assert "lease" in ks.lease(req)  # the same nonce: the malformed request did not spend it
