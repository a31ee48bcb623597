"""The TPM attestor against a real software TPM: keys stay in the chip, policies and quotes hold or fail."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from codemoat.attest import AttestError
from codemoat.attest.tpm import TAMPER_NV_INDEX, TAMPER_PCR, TpmAttestor
from codemoat.vault.tpmwrap import QuoteRefused, unwrap_p256, verify_quote, wrap_p256

PCRS = [TAMPER_PCR]


def _ident(tcti: str) -> dict:
    with TpmAttestor(tcti) as a:
        ident = a.identity(PCRS)
    ident.pop("unwrap_certify")  # the AK's certification of the unwrap key: a fresh ECDSA signature each time
    ident.pop("crl_certify"), ident.pop("latch_certify")  # and of the CRL counter and the latch (the same)
    return ident


def test_identity_is_derived_in_the_chip_same_chip_same_keys_other_chip_other_keys(swtpm_factory):
    one, two = swtpm_factory(), swtpm_factory()
    a1, a1_again, b = _ident(one.tcti), _ident(one.tcti), _ident(two.tcti)
    assert a1 == a1_again  # primary keys: re-derived from the seed, nothing stored on disk
    for k in ("ak", "unwrap", "ek"):
        assert a1[k] != b[k]
    for k in ("ak", "unwrap"):
        key = serialization.load_der_public_key(bytes.fromhex(a1[k]))
        assert isinstance(key.curve, ec.SECP256R1)
    assert a1["policy"] == {
        "bank": "sha256",
        "pcrs": PCRS,
        "digest": hashlib.sha256(bytes(32)).hexdigest(),
        "latch": {"index": TAMPER_NV_INDEX, "count": a1["policy"]["latch"]["count"]},
    }  # PCR 15 after reset: zeros; the tamper latch as the chip counts it


def test_ek_certificate_chains_to_the_local_ca_and_names_the_ek(swtpm, swtpm_ca):
    ident = _ident(swtpm.tcti)
    cert = x509.load_der_x509_certificate(bytes.fromhex(ident["ek_cert"]))
    issuer = x509.load_pem_x509_certificate((swtpm_ca / "issuercert.pem").read_bytes())
    root = x509.load_pem_x509_certificate((swtpm_ca / "swtpm-localca-rootca-cert.pem").read_bytes())
    cert.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(root)
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == bytes.fromhex(ident["ek"])


def test_ek_certificate_of_another_ca_does_not_chain(swtpm):
    ident = _ident(swtpm.tcti)
    cert = x509.load_der_x509_certificate(bytes.fromhex(ident["ek_cert"]))
    stranger = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "not the CA")])
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    fake = (
        x509.CertificateBuilder()
        .subject_name(cert.issuer)
        .issuer_name(name)
        .public_key(stranger.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(stranger, hashes.SHA256())
    )
    with pytest.raises(ValueError):  # the issuer name matches, the signature cannot
        cert.verify_directly_issued_by(fake)


def test_zgen_in_the_chip_unwraps_and_an_extended_pcr_refuses(swtpm):
    ident = _ident(swtpm.tcti)
    wrapped = wrap_p256(ident["unwrap"], b"k" * 32, b"ctx")
    with TpmAttestor(swtpm.tcti) as a:
        got = unwrap_p256(lambda p: a.zgen(ident["policy"], p), ident["unwrap"], wrapped, b"ctx", "key")
        assert got == b"k" * 32
        a.extend(TAMPER_PCR, b"chassis opened")
        with pytest.raises(AttestError, match="PCRs no longer match"):
            unwrap_p256(lambda p: a.zgen(ident["policy"], p), ident["unwrap"], wrapped, b"ctx", "key")


def test_another_chip_cannot_unwrap(swtpm_factory):
    one, two = swtpm_factory(), swtpm_factory()
    ident = _ident(one.tcti)
    wrapped = wrap_p256(ident["unwrap"], b"k" * 32, b"ctx")
    with TpmAttestor(two.tcti) as b:
        assert b.unwrap_public(ident["policy"]) == ""  # no tamper latch here to derive a key with
        from codemoat.vault.codec import VaultError

        with pytest.raises(AttestError, match="no tamper latch"):  # a chip that never ran codemoat
            unwrap_p256(lambda p: b.zgen(ident["policy"], p), ident["unwrap"], wrapped, b"ctx", "key")
        assert b.tamper_count() == ident["policy"]["latch"]["count"]  # the same count in a chip of its own
        assert b.unwrap_public(ident["policy"]) not in ("", ident["unwrap"])
        with pytest.raises(VaultError, match="cannot be unwrapped"):
            unwrap_p256(lambda p: b.zgen(ident["policy"], p), ident["unwrap"], wrapped, b"ctx", "key")


def _quote(tcti: str, ident: dict, data: bytes) -> dict:
    from codemoat.vault.tpmwrap import quote_json

    with TpmAttestor(tcti) as a:
        return quote_json(ident["ak"], a.quote(ident["policy"], data))


def test_quote_verifies_with_the_nonce_and_each_forgery_is_refused(swtpm_factory):
    import base64

    one, two = swtpm_factory(), swtpm_factory()
    ident, other = _ident(one.tcti), _ident(two.tcti)
    nonce = hashlib.sha256(b"nonce").digest()
    q = _quote(one.tcti, ident, nonce)
    info = verify_quote(ident, q, nonce)
    assert info.pcr_digest.hex() == ident["policy"]["digest"] and info.reset_count >= 0

    with pytest.raises(QuoteRefused) as e:  # a quote over another nonce: stale or replayed
        verify_quote(ident, q, hashlib.sha256(b"other").digest())
    assert e.value.code == "stale_quote"
    raw = bytearray(base64.b64decode(q["attest"]))
    raw[-1] ^= 1  # the PCR digest, edited
    with pytest.raises(QuoteRefused) as e:
        verify_quote(ident, dict(q, attest=base64.b64encode(bytes(raw)).decode()), nonce)
    assert e.value.code == "bad_quote"
    with pytest.raises(QuoteRefused) as e:  # another chip's AK
        verify_quote(ident, _quote(two.tcti, other, nonce), nonce)
    assert e.value.code == "unknown_ak"
    with pytest.raises(QuoteRefused) as e:  # another chip's quote claiming to be this AK
        verify_quote(ident, dict(_quote(two.tcti, other, nonce), ak=ident["ak"]), nonce)
    assert e.value.code == "bad_quote"
    with TpmAttestor(one.tcti) as a:
        a.extend(TAMPER_PCR, b"chassis opened")
    with pytest.raises(QuoteRefused) as e:
        verify_quote(ident, _quote(one.tcti, ident, nonce), nonce)
    assert e.value.code == "pcr_mismatch"


def test_unreachable_tpm_is_one_line(free_port):
    with pytest.raises(AttestError, match="cannot reach the TPM") as e:
        with TpmAttestor(f"swtpm:host=127.0.0.1,port={free_port}"):
            pass
    assert "\n" not in str(e.value)
