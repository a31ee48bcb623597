"""SEV-SNP in leases (vault.snpbind): a license entry naming an SNP guest's launch measurement makes the
key server require an attestation report over the request. No SNP guest is available here, so the
refusal paths run on the real Milan report of tests/attest/data (its chain and signature verify: it is
refused only where it must be, at report_data, which a fresh nonce never matches); the acceptance path
is the verifier's own (tests/attest/test_sevsnp.py: the published report verifies with its report_data)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from codemoat.vault.codec import VaultError
from codemoat.vault.keyserver import ATTEST_LOG, REQUEST_DOMAIN, KeyServer, LeaseDenied
from codemoat.vault.lease import LeaseClient
from codemoat.vault.license import License
from codemoat.vault.machine import MachineKey
from codemoat.vault.snpbind import SNP_ARK_FILE, trust_ark
from codemoat.vault.vendor import Vendor
from ggufs import write_gguf

DATA = Path(__file__).parent / "data" / "sev_snp_milan"
RAW = bytes.fromhex((DATA / "report_milan.hex").read_text().strip())
VCEK, ASK, ARK = (DATA / "vcek_milan.der").read_bytes(), (DATA / "ask.pem").read_text(), (DATA / "ark.pem").read_bytes()
MEASUREMENT = RAW[0x90:0xC0].hex()


@pytest.fixture
def snp(tmp_path):
    from vault.vaulthelp import bundle

    vendor = Vendor.init(tmp_path / "vendor")
    trust_ark(vendor.root, ARK)
    key = MachineKey.load_or_create()
    ident = dict(key.identity(), snp={"measurement": MEASUREMENT})
    model = tmp_path / "m.gguf"
    write_gguf(model, 20_000)

    class Guest:  # the license's machine: this identity, recorded with the guest's launch measurement
        id = key.id

        def identity(self):
            return ident

    _, lic, _ = bundle(vendor, model, tmp_path / "lease", Guest(), mode="lease", keyserver="http://127.0.0.1:9")
    client = LeaseClient(License.load(lic), key)
    ks = KeyServer(vendor)
    yield vendor, ks, lambda: client._signed_request(ks.challenge(client.lic.id)["nonce"], REQUEST_DOMAIN)
    client.close()
    vendor.close()


def _report(raw: bytes = RAW, vcek: bytes = VCEK, ask: str = ASK) -> dict:
    return {"report": raw.hex(), "vcek": base64.b64encode(vcek).decode(), "ask": ask}


def _refused(ks, req, match: str) -> None:
    with pytest.raises(LeaseDenied, match=match) as e:
        ks.lease(req)
    assert e.value.code == "snp_refused"


def _codes(vendor) -> list[str]:
    p = vendor.root / ATTEST_LOG
    return [json.loads(x)["code"] for x in p.read_text().splitlines()] if p.exists() else []


def test_the_license_names_the_measurement_and_a_lease_without_a_report_is_refused(snp):
    vendor, ks, request = snp
    assert ks._licensed(request()["license_id"]).machines[MachineKey.load().id]["snp"] == {"measurement": MEASUREMENT}
    _refused(ks, request(), "carries no SEV-SNP attestation report")
    assert _codes(vendor) == ["snp_refused"]


def test_a_real_report_not_over_this_nonce_is_refused_after_its_chain_and_signature_hold(snp):
    vendor, ks, request = snp
    _refused(ks, dict(request(), snp=_report()), "report_data differs")  # every check before it passed
    bad = bytearray(RAW)
    bad[0x90] ^= 1  # the measurement edited: the VCEK's signature no longer holds
    _refused(ks, dict(request(), snp=_report(bytes(bad))), "signature does not verify")
    _refused(ks, dict(request(), snp=_report(ask=ARK.decode())), "not signed by the ASK")  # the ASK swapped for the ARK
    _refused(ks, dict(request(), snp=_report(vcek=b"\x30\x03\x02\x01\x00")), "cannot be parsed")
    _refused(ks, dict(request(), snp={"report": "zz", "vcek": "", "ask": ASK}), "not hex")
    (vendor.root / SNP_ARK_FILE).unlink()  # a key server that pins no AMD root trusts none the client sends
    _refused(ks, dict(request(), snp=_report()), "pins no AMD root")
    assert _codes(vendor) == ["snp_refused"] * 6


def test_a_replayed_request_costs_no_second_report_check(snp, monkeypatch):
    """A report check is a certificate chain and a P-384 verify; a signed request replayed with its
    (refused) report ran all of it again before the spent nonce was found. Now the nonce is spent
    before the check: every replay is bad_nonce, at this worker or another, with no report check."""
    import codemoat.attest.sevsnp as sevsnp

    vendor, ks, request = snp
    real, calls = sevsnp.verify_report, []
    monkeypatch.setattr(sevsnp, "verify_report", lambda *a, **k: calls.append(1) or real(*a, **k))
    req = dict(request(), snp=_report())
    _refused(ks, req, "report_data differs")
    for server in [ks] * 3 + [KeyServer(vendor)] * 3:
        with pytest.raises(LeaseDenied) as e:
            server.lease(req)
        assert e.value.code == "bad_nonce"
    assert len(calls) == 1
    assert _codes(vendor) == ["snp_refused"]


def test_a_malformed_snp_block_is_refused_at_issue():
    from codemoat.vault.snpbind import check_snp_block

    for bad in ({"measurement": "ab"}, {"measurement": MEASUREMENT, "extra": 1}, {"measurement": "zz" * 48}, "x"):
        with pytest.raises(VaultError, match="'snp' block"):
            check_snp_block(bad)
