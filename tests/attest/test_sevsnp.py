"""The SEV-SNP verifier against a real Milan report and AMD's chain (tests/attest/data/sev_snp_milan/SOURCE.md):
it verifies as published, and every mutated field, signature byte or certificate is refused."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from codemoat.attest.sevsnp import REPORT_SIZE, SIGNED_SIZE, SnpRefused, verify_report

DATA = Path(__file__).parent / "data" / "sev_snp_milan"
RAW = bytes.fromhex((DATA / "report_milan.hex").read_text().strip())
VCEK, ASK, ARK = (DATA / "vcek_milan.der").read_bytes(), (DATA / "ask.pem").read_bytes(), (DATA / "ark.pem").read_bytes()


def _verify(raw: bytes = RAW, vcek: bytes = VCEK, ask: bytes = ASK, ark: bytes = ARK, trusted: bytes = ARK, **kw):
    return verify_report(raw, vcek, ask, ark, trusted, **kw)


def test_the_published_report_verifies_with_amds_chain():
    rep = _verify(report_data=RAW[0x50:0x90], measurement=RAW[0x90:0xC0])
    assert len(RAW) == REPORT_SIZE and rep.version == 2 and rep.chip_id == RAW[0x1A0:0x1E0]
    assert rep.reported_tcb == bytes.fromhex("0300000000000873")  # bootloader 3, SNP 8, microcode 115 (the VCEK says so too)


# each field of the signed part (SEV-SNP ABI Table 22), then every 64th byte (reserved ones too)
FIELDS = {
    "version": 0x00, "guest_svn": 0x04, "policy": 0x08, "family_id": 0x10, "image_id": 0x20, "vmpl": 0x30,
    "signature_algo": 0x34, "current_tcb": 0x38, "platform_info": 0x40, "flags": 0x48, "report_data": 0x50,
    "measurement": 0x90, "host_data": 0xC0, "id_key_digest": 0xE0, "author_key_digest": 0x110, "report_id": 0x140,
    "report_id_ma": 0x160, "reported_tcb": 0x180, "chip_id": 0x1A0, "committed_tcb": 0x1E0, "launch_tcb": 0x1F0,
}  # fmt: skip


@pytest.mark.parametrize("offset", sorted(set(FIELDS.values()) | set(range(0, SIGNED_SIZE, 64))))
def test_every_signed_field_mutated_is_refused(offset):
    raw = bytearray(RAW)
    raw[offset] ^= 0x01
    with pytest.raises(SnpRefused):
        _verify(bytes(raw))


@pytest.mark.parametrize("offset", [SIGNED_SIZE, SIGNED_SIZE + 71, SIGNED_SIZE + 72, SIGNED_SIZE + 143, SIGNED_SIZE + 200])
def test_signature_bytes_mutated_are_refused(offset):
    raw = bytearray(RAW)
    raw[offset] ^= 0x01
    with pytest.raises(SnpRefused, match="signature"):
        _verify(bytes(raw))


def test_wrong_size_another_nonce_or_measurement_are_refused():
    with pytest.raises(SnpRefused, match="1184 bytes"):
        _verify(RAW[:-1])
    with pytest.raises(SnpRefused, match="report_data differs"):
        _verify(report_data=b"another nonce")
    with pytest.raises(SnpRefused, match="measurement"):
        _verify(measurement=bytes(48))


def _self_signed(name: str) -> bytes:
    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
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
        .sign(k, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_a_chain_not_rooted_in_the_pinned_ark_is_refused():
    with pytest.raises(SnpRefused, match="not AMD's root"):  # another root presented, the real one pinned
        _verify(ark=_self_signed("ARK-Milan"))
    with pytest.raises(SnpRefused, match="not AMD's root"):  # the verifier pinned another root
        _verify(trusted=_self_signed("ARK-Milan"))
    with pytest.raises(SnpRefused, match="ASK certificate is not signed by the ARK"):
        _verify(ask=_self_signed("SEV-Milan"))
    with pytest.raises(SnpRefused, match="VCEK certificate is not signed by the ASK"):
        _verify(ask=ARK)  # the ARK posing as the ASK: it signed the ASK, not the VCEK
    bad = bytearray(VCEK)
    bad[-10] ^= 0x01  # the VCEK certificate's own signature
    with pytest.raises(SnpRefused):
        _verify(vcek=bytes(bad))
