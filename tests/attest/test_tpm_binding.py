"""Provisioning binds the AK to the certified EK (MakeCredential / ActivateCredential, real swtpm chips),
and the TPM clock floor outlives a key server restart (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime
import shutil
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from codemoat.attest import AttestError
from codemoat.attest.tpm import TAMPER_PCR, TpmAttestor
from codemoat.vault.codec import VaultError
from codemoat.vault.machine import TCTI_ENV, parse_identity
from codemoat.vault.tpmbind import EK_CA_FILE, activate, challenge, confirm, require_bound, trust_ca
from codemoat.vault.tpmcred import ak_name, make_credential
from codemoat.vault.vendor import Vendor
from ggufs import write_gguf

from .tpmhelp import bind, tpm_machine, trust_swtpm_ca


def _model(tmp_path):
    p = tmp_path / "m.gguf"
    write_gguf(p, 20_000)
    return p


def test_an_ak_from_another_tpm_beside_this_tpms_ek_certificate_is_refused(vendor, swtpm_factory, tmp_path):
    one, two = swtpm_factory(), swtpm_factory()
    key = tpm_machine(one)
    ident = parse_identity(key.identity())
    with TpmAttestor(two.tcti) as a:
        stranger = a.identity([TAMPER_PCR])
    # the genuine chip's EK certificate, presented with an AK that lives in another chip
    forged = dict(ident, tpm=dict(ident["tpm"], ak=stranger["ak"], ak_public=stranger["ak_public"]))
    trust_swtpm_ca(vendor, one.ca)
    ch = challenge(vendor, forged)  # the certificate itself is genuine: the challenge is made...
    with pytest.raises(AttestError, match="refused the vendor's credential"):  # ...the EK's chip lacks that AK
        activate(TpmAttestor(one.tcti), key.id, forged["tpm"], ch)
    with pytest.raises(AttestError, match="refused the vendor's credential"):  # ...the AK's chip lacks that EK
        activate(TpmAttestor(two.tcti), key.id, forged["tpm"], ch)
    guess = {"kind": "codemoat-tpm-activation", "machine_id": key.id, "ak_id": ch["ak_id"], "secret": "00" * 32}
    with pytest.raises(VaultError, match="does not live in the TPM"):
        confirm(vendor, guess)
    with pytest.raises(VaultError, match="not bound to its EK"):
        require_bound(vendor.engine, forged)
    moat = tmp_path / "acme.moat"
    vendor.seal(_model(tmp_path), "acme", moat)
    with pytest.raises(VaultError, match="not bound to its EK"):  # and no license names it
        vendor.issue_license(customer="acme", model=moat, machines=[forged], expires=int(time.time()) + 99)

    # the genuine pair: the chip opens the credential, the vendor binds the AK, a license may name it
    bind(vendor, key, one.ca)
    require_bound(vendor.engine, ident)
    doc = vendor.issue_license(customer="acme", model=moat, machines=[ident], expires=int(time.time()) + 99)
    assert doc["license"]["machines"][0]["binding"] == "tpm"
    with pytest.raises(VaultError, match="not bound to its EK"):  # the forged pair is still not
        require_bound(vendor.engine, forged)
    again = challenge(vendor, ident)
    answer = activate(TpmAttestor(one.tcti), key.id, ident["tpm"], again)
    confirm(vendor, answer)
    with pytest.raises(VaultError, match="no open TPM challenge"):  # an answer counts once
        confirm(vendor, answer)


def _ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    k = ec.generate_private_key(ec.SECP256R1())
    n = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(n)
        .issuer_name(n)
        .public_key(k.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(k, hashes.SHA256())
    )
    return k, cert


def test_ek_certificates_must_chain_to_a_trusted_manufacturer_ca(vendor, swtpm):
    key = tpm_machine(swtpm)
    ident = parse_identity(key.identity())
    with pytest.raises(VaultError, match="trusts no TPM manufacturer CA"):
        challenge(vendor, ident)
    _, other = _ca("another TPM maker")
    trust_ca(vendor.root, other.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(VaultError, match="does not chain to a TPM manufacturer CA"):
        challenge(vendor, ident)
    (vendor.root / EK_CA_FILE).unlink()
    trust_swtpm_ca(vendor, swtpm.ca)
    for bad, why in (
        ({"ek_cert": None}, "no EK certificate"),
        ({"ek": ident["tpm"]["unwrap"]}, "names another key than its EK"),
        ({"ak": ident["tpm"]["unwrap"]}, "names another key than the identity's AK"),
        ({"ak_public": ident["tpm"]["ak_public"][:-4]}, "malformed"),
    ):
        with pytest.raises(VaultError, match=why):
            challenge(vendor, dict(ident, tpm=dict(ident["tpm"], **bad)))
    # an AK public area with the decrypt bit set (not a restricted signing key): refused before any credential
    area = bytearray(bytes.fromhex(ident["tpm"]["ak_public"]))
    area[5] |= 0x02  # TPMA_OBJECT bit 17 (decrypt), in the attributes' second byte
    with pytest.raises(VaultError, match="not a restricted signing key"):
        ak_name(area.hex(), ident["tpm"]["ak"])
    assert challenge(vendor, ident)["kind"] == "codemoat-tpm-challenge"


def test_make_credential_for_an_ecc_ek_activates_in_the_chip(swtpm, monkeypatch):
    monkeypatch.setattr("codemoat.attest.tpm._EK_TYPES", ("EK-ECC256",))  # the ECC P-256 EK (swtpm certifies the RSA one)
    with TpmAttestor(swtpm.tcti) as a:
        ident = a.identity([TAMPER_PCR])
        assert serialization.load_der_public_key(bytes.fromhex(ident["ek"])).curve.name == "secp256r1"
        blob, secret = make_credential(ident["ek"], ak_name(ident["ak_public"], ident["ak"]), b"e" * 32)
        assert a.activate_credential(blob, secret) == b"e" * 32
        blob, secret = make_credential(ident["ek"], b"\x00\x0b" + bytes(32), b"e" * 32)  # bound to another name
        with pytest.raises(AttestError, match="refused the vendor's credential"):
            a.activate_credential(blob, secret)


@pytest.mark.slow
def test_tpm_rollback_is_refused_after_a_key_server_restart(database_url, swtpm, tmp_path, monkeypatch):
    from codemoat.vault.keyserver import REQUEST_DOMAIN, KeyServer, LeaseDenied
    from codemoat.vault.lease import LeaseClient
    from codemoat.vault.license import License
    from vault.vaulthelp import bundle

    vendor = Vendor.init(tmp_path / "vendor", database_url=database_url)
    key = tpm_machine(swtpm, vendor)
    monkeypatch.setenv(TCTI_ENV, swtpm.tcti)
    _, lic_path, _ = bundle(vendor, _model(tmp_path), tmp_path / "out", key, mode="lease", keyserver="http://127.0.0.1:9")
    lic = License.load(lic_path)

    def power_off() -> None:
        # TPM2_Shutdown(CLEAR), then stop: the next TPM2_Startup(CLEAR) is a TPM Reset (resetCount + 1).
        # Killed without it, swtpm may not have saved the count the last start made, and counts it again.
        from tpm2_pytss import TPM2_SU

        with TpmAttestor(swtpm.tcti) as a:
            a.ctx.shutdown(TPM2_SU.CLEAR)
        swtpm.stop()

    def restart_tpm(state_from=None) -> None:
        if swtpm.proc is not None:
            power_off()
        if state_from is not None:
            shutil.rmtree(swtpm.state)
            shutil.copytree(state_from, swtpm.state)
        swtpm.start()  # TPM2_Startup(CLEAR): the reset count goes up by one
        monkeypatch.setenv(TCTI_ENV, swtpm.tcti)

    client = LeaseClient(lic, key)  # one serving process throughout: one seat

    def request(ks: KeyServer) -> dict:
        return client._signed_request(ks.challenge(lic.id)["nonce"], REQUEST_DOMAIN)

    power_off()
    snapshot = tmp_path / "tpm-snapshot"  # what a vTPM snapshot keeps: the whole state
    shutil.copytree(swtpm.state, snapshot)
    restart_tpm()
    restart_tpm()
    ks = KeyServer(vendor)
    assert ks.lease(request(ks))["lease"]["keys"]["alg"] == "P256-HKDF-SHA256-A256GCM"
    old = request(ks)

    vendor.close()  # the key server restarts: nothing of the last one's memory is left
    vendor = Vendor.open(tmp_path / "vendor")
    ks = KeyServer(vendor)
    assert ks.lease(old)["lease"]["ttl"] > 0  # its challenge is in the database: the restart forgot nothing
    with pytest.raises(LeaseDenied) as e:  # and it is answered once
        ks.lease(old)
    assert e.value.code == "bad_nonce"
    with pytest.raises(LeaseDenied) as e:  # its quote on a fresh nonce
        ks.lease(dict(request(ks), quote=old["quote"]))
    assert e.value.code == "stale_quote"

    # the TPM put back to the snapshot (a lower reset count), first seen by the restarted server
    restart_tpm(state_from=snapshot)
    with pytest.raises(LeaseDenied) as e:
        ks.lease(request(ks))
    assert e.value.code == "tpm_rollback" and "went backwards" in str(e.value)
    restart_tpm()
    restart_tpm()  # rebooted past the highest reset count seen: a chip moving forward is fine
    assert ks.lease(request(ks))["lease"]["ttl"] > 0

    restart_tpm(state_from=snapshot)  # restored once more: refused, until the vendor binds the chip again
    with pytest.raises(LeaseDenied) as e:
        ks.lease(request(ks))
    assert e.value.code == "tpm_rollback"
    bind(vendor, key, swtpm.ca)  # challenge, activation in the chip, confirm: the floor starts over
    assert ks.lease(request(ks))["lease"]["ttl"] > 0
    client.close()
    vendor.close()


def test_a_policy_that_leaves_out_the_tamper_pcr_is_not_licensed(vendor, swtpm):
    """`machine-id --tpm` refuses --pcrs without the tamper PCR (cli/tpm_cmd.py); the vendor did not. A modified one
    made its unwrap key for a policy over PCR 16 alone (which software may reset: TPM2_PCR_Reset), and the AK
    certified that key: licensed, a tamper event's extend of PCR 15 no longer ended serving at once (only the latch,
    counted after it, did)."""
    key = tpm_machine(swtpm, vendor)
    with TpmAttestor(swtpm.tcti) as a:
        block = a.identity([16])
    ident = dict(parse_identity(key.identity()), tpm=block)
    with pytest.raises(VaultError, match=f"tamper PCR {TAMPER_PCR}") as e:
        require_bound(vendor.engine, ident)
    assert "\n" not in str(e.value)
