"""Attested leases (a real swtpm, the real key server): a fresh quote or nothing is released."""

from __future__ import annotations

import json

import httpx
import pytest

from attest.swtpm_fixture import *  # noqa: F403  (the swtpm fixtures; tests/ is on the path)
from attest.tpmhelp import tpm_machine

from codemoat.attest.tpm import TAMPER_PCR, TpmAttestor
from codemoat.vault.codec import b64e
from codemoat.vault.keyserver import ATTEST_LOG, REQUEST_DOMAIN, TERMINAL, KeyServer, LeaseDenied
from codemoat.vault.lease import LeaseClient, outbound_path
from codemoat.vault.license import License
from codemoat.vault.machine import MachineKey
from codemoat.vault.reprovision import reprovision

try:  # tests/vault as a package, or as a plain folder on sys.path
    from .vaulthelp import bundle
except ImportError:
    from vaulthelp import bundle


def _lease_license(vendor, model, tmp_path, machine, url="http://127.0.0.1:9"):
    _, lic, doc = bundle(vendor, model, tmp_path / "out", machine, mode="lease", keyserver=url, lease_ttl=10, grace=5)
    return License.load(lic), doc


def _refusals(vendor) -> list[dict]:
    p = vendor.root / ATTEST_LOG
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def test_attested_lease_over_http_quotes_the_nonce_and_unwraps_in_the_chip(vendor, model, tmp_path, swtpm, keyserver):
    machine = tpm_machine(swtpm, vendor)
    lic, _ = _lease_license(vendor, model, tmp_path, machine, keyserver.url)
    client = LeaseClient(lic, machine)
    lease = client.acquire()
    assert lease.content_key == vendor.content_key(lic.model["file_id"])
    sent = [json.loads(x) for x in outbound_path().read_text().splitlines()]
    body = json.loads(next(x["body"] for x in sent if x["destination"].endswith("/v1/lease") and x["body"]))
    assert set(body["quote"]) == {"ak", "attest", "r", "s", "latch"}  # the quote and the tamper latch go out, nothing else
    assert client.acquire().content_key == lease.content_key  # a renewal quotes again
    client.close()


def test_lease_without_a_quote_gets_a_signed_refusal_recorded_by_the_vendor(vendor, model, tmp_path, swtpm, keyserver):
    machine = tpm_machine(swtpm, vendor)
    lic, _ = _lease_license(vendor, model, tmp_path, machine, keyserver.url)
    client = LeaseClient(lic, machine)
    nonce = httpx.post(keyserver.url + "/v1/lease/challenge", json={"license_id": lic.id}).json()["nonce"]
    req = client._signed_request(nonce, REQUEST_DOMAIN)
    del req["quote"]  # a machine key copied elsewhere can sign, but cannot quote
    r = httpx.post(keyserver.url + "/v1/lease", json=req)
    assert r.status_code == 403 and "lease" not in r.json()
    err = client._refusal(r.json(), r.status_code, nonce, machine.id)
    assert isinstance(err, LeaseDenied) and err.code == "bad_quote"  # signed and bound to this request
    assert [x["code"] for x in _refusals(vendor)] == ["bad_quote"]
    client.close()


def _ks_request(ks: KeyServer, client: LeaseClient) -> dict:
    return client._signed_request(ks.challenge(client.lic.id)["nonce"], REQUEST_DOMAIN)


def test_each_bad_quote_is_refused_and_releases_nothing(vendor, model, tmp_path, swtpm_factory, vault_home, monkeypatch):
    one, two = swtpm_factory(), swtpm_factory()
    machine = tpm_machine(one, vendor)
    lic, _ = _lease_license(vendor, model, tmp_path, machine)
    ks = KeyServer(vendor)
    client = LeaseClient(lic, machine)
    ok = ks.lease(_ks_request(ks, client))
    assert ok["lease"]["keys"]["alg"] == "P256-HKDF-SHA256-A256GCM"

    def refused(req: dict, code: str) -> None:
        with pytest.raises(LeaseDenied) as e:
            ks.lease(req)
        assert e.value.code == code, str(e.value)

    # a quote replayed onto a fresh nonce
    old = _ks_request(ks, client)
    fresh = _ks_request(ks, client)
    refused(dict(fresh, quote=old["quote"]), "stale_quote")
    # a signature edited
    req = _ks_request(ks, client)
    r = bytearray(__import__("base64").b64decode(req["quote"]["r"]))
    r[0] ^= 1
    refused(dict(req, quote=dict(req["quote"], r=b64e(bytes(r)))), "bad_quote")
    # the same home on another chip (the TPM's AK is not the registered one)
    monkeypatch.setenv("CODEMOAT_TPM_TCTI", two.tcti)
    other = LeaseClient(lic, MachineKey.load())
    other.tpm = dict(other.tpm)
    with TpmAttestor(two.tcti) as a:
        other.tpm["ak"] = a.identity([TAMPER_PCR])["ak"]
    refused(_ks_request(ks, other), "unknown_ak")
    # ...and claiming the registered AK: the signature cannot hold
    other.tpm["ak"] = client.tpm["ak"]
    refused(_ks_request(ks, other), "bad_quote")
    monkeypatch.delenv("CODEMOAT_TPM_TCTI")
    # the TPM's clock or reset count going backwards (a restored TPM state)
    from codemoat.vault.tpmbind import key_id, tpm_keys_t

    with vendor.engine.begin() as c:  # the vendor database's floor for this AK, above what the chip shows
        c.execute(
            tpm_keys_t.update().where(tpm_keys_t.c.ak_id == key_id(machine.tpm["identity"]["ak"])).values(reset_count=10**6)
        )
    refused(_ks_request(ks, client), "tpm_rollback")
    assert [x["code"] for x in _refusals(vendor)] == ["stale_quote", "bad_quote", "unknown_ak", "bad_quote", "tpm_rollback"]
    assert "pcr_mismatch" in TERMINAL and "unknown_ak" not in TERMINAL  # a proxy can name any AK (test_tpm_lease_proxy)


def test_tamper_ends_the_lease_and_reprovision_brings_it_back(vendor, model, tmp_path, swtpm, keyserver):
    machine = tpm_machine(swtpm, vendor)
    lic, _ = _lease_license(vendor, model, tmp_path, machine, keyserver.url)
    client = LeaseClient(lic, machine)
    client.acquire()
    with TpmAttestor(swtpm.tcti) as a:
        a.extend(TAMPER_PCR, b"codemoat-tamper-v1\x00chassis opened")
    with pytest.raises(LeaseDenied) as e:
        client.acquire()
    assert e.value.code == "pcr_mismatch" and e.value.code in TERMINAL  # the keeper unloads at once
    assert _refusals(vendor)[-1]["code"] == "pcr_mismatch"

    key = MachineKey.load()
    fresh = dict(key.identity(), tpm=key.enable_tpm(swtpm.tcti, [TAMPER_PCR]))
    reprovision(vendor, lic.id, fresh)
    # the same .lic on the customer side: the signed answer names the new policy; the server re-read the license
    assert client.acquire().content_key == vendor.content_key(lic.model["file_id"])
    client.close()


def test_a_tpm_gone_mid_lease_is_a_failed_renewal_and_the_keeper_lets_go(vendor, model, tmp_path, swtpm, keyserver):
    from codemoat.vault.clock import ManualClock
    from codemoat.vault.codec import VaultError
    from codemoat.vault.leasekeeper import LeaseKeeper

    machine = tpm_machine(swtpm, vendor)
    lic, _ = _lease_license(vendor, model, tmp_path, machine, keyserver.url)
    clock = ManualClock()
    client = LeaseClient(lic, machine, clock=clock)
    lost: list[str] = []
    keeper = LeaseKeeper(client, client.acquire(), on_lost=lost.append, on_regained=lambda _: None, clock=clock)
    swtpm.stop()
    with pytest.raises(VaultError, match="TPM: cannot reach the TPM"):  # a VaultError: the keeper counts it
        client.acquire()
    clock.advance(keeper.lease.ttl / 2 + 0.1)
    keeper.tick()
    assert keeper.state == "renewing" and "cannot reach the TPM" in keeper.last_error
    clock.advance(keeper.lease.ttl + keeper.lease.grace)
    keeper.tick()
    assert keeper.state == "lost" and lost  # no chip, no model after TTL + grace
    client.close()


def test_a_machine_removed_while_its_license_is_cached_gets_a_signed_refusal(
    vendor, model, tmp_path, swtpm, keyserver, monkeypatch
):
    """A quote that fails against the cached license makes the server re-read it; if the vendor has
    taken the machine off the license meanwhile, the answer is a signed `wrong_machine`, not a 500."""
    from codemoat.vault import keyserver as ks_mod
    from codemoat.vault.vendor import licenses_t

    monkeypatch.setattr(ks_mod, "DOC_TTL", 3600.0)  # the first lookup must hit the cache, however slow the run
    machine = tpm_machine(swtpm, vendor)
    lic, _ = _lease_license(vendor, model, tmp_path, machine, keyserver.url)
    client = LeaseClient(lic, machine)
    client.acquire()  # the key server now holds the license document
    doc = json.loads(vendor.license_row(lic.id).document)
    doc["license"]["machines"] = [m for m in doc["license"]["machines"] if m["id"] != machine.id]
    with vendor.engine.begin() as c:
        c.execute(licenses_t.update().where(licenses_t.c.id == lic.id).values(document=json.dumps(doc)))
    with TpmAttestor(swtpm.tcti) as a:  # the quote no longer matches the cached policy: the server re-reads
        a.extend(TAMPER_PCR, b"codemoat-tamper-v1\x00chassis opened")
    with pytest.raises(LeaseDenied) as e:  # LeaseDenied only from a refusal under the key server's signature
        client.acquire()
    assert e.value.code == "wrong_machine" and e.value.code in TERMINAL, str(e.value)
    client.close()


def test_a_machine_relicensed_without_its_tpm_while_cached_gets_a_software_lease(vendor, model, tmp_path, swtpm, monkeypatch):
    """The same re-read, when the vendor's database now binds the machine to its software keys: the
    lease the first lookup would have given (wrapped to the X25519 key), not a 500 from a missing TPM block."""
    from codemoat.vault import keyserver as ks_mod
    from codemoat.vault.vendor import licenses_t

    monkeypatch.setattr(ks_mod, "DOC_TTL", 3600.0)
    machine = tpm_machine(swtpm, vendor)
    lic, _ = _lease_license(vendor, model, tmp_path, machine)
    ks = KeyServer(vendor)
    client = LeaseClient(lic, machine)
    ks.lease(_ks_request(ks, client))  # cached, TPM-bound
    doc = json.loads(vendor.license_row(lic.id).document)
    for m in doc["license"]["machines"]:
        m.pop("tpm", None)
        m["binding"] = "software"
    with vendor.engine.begin() as c:
        c.execute(licenses_t.update().where(licenses_t.c.id == lic.id).values(document=json.dumps(doc)))
    with TpmAttestor(swtpm.tcti) as a:
        a.extend(TAMPER_PCR, b"codemoat-tamper-v1\x00chassis opened")
    answer = ks.lease(_ks_request(ks, client))["lease"]
    assert "tpm" not in answer and answer["keys"]["alg"] != "P256-HKDF-SHA256-A256GCM"
    client.close()
