"""SEV-SNP checks past the signature, reached with a chain of our own pinned as the root (AMD's real report
cannot be re-signed): a debuggable guest, a VCEK of another chip, a VCEK whose TCB is older than the
report's, and our chain carrying AMD's subject names while AMD's ARK is pinned."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from codemoat.attest.sevsnp import HWID_OID, POLICY_DEBUG, SIGNED_SIZE, TCB_OIDS, SnpRefused, verify_report

DATA = Path(__file__).parent / "data" / "sev_snp_milan"
RAW = bytes.fromhex((DATA / "report_milan.hex").read_text().strip())
AMD_ARK = (DATA / "ark.pem").read_bytes()
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, cn)])


def _der_int(v: int) -> bytes:
    body = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def _chain(chip_id: bytes, tcb: bytes):
    """(ARK pem, ASK pem, VCEK der, VCEK private key): AMD's names, our keys, PSS like AMD's."""
    now = datetime.datetime.now(datetime.UTC)
    ark_k, ask_k = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    vcek_k = ec.generate_private_key(ec.SECP384R1())

    def build(subject, issuer, pub, signer, ca, exts=()):
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(_name(issuer))
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        for oid, value in exts:
            b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
        return b.sign(signer, hashes.SHA384(), rsa_padding=PSS)

    ark = build("ARK-Milan", "ARK-Milan", ark_k.public_key(), ark_k, True)
    ask = build("SEV-Milan", "ARK-Milan", ask_k.public_key(), ark_k, True)
    exts = [(HWID_OID, bytes([0x04, len(chip_id)]) + chip_id)] + [(oid, _der_int(tcb[i])) for i, oid in TCB_OIDS.items()]
    vcek = build("SEV-VCEK", "SEV-Milan", vcek_k.public_key(), ask_k, False, exts)
    pem = serialization.Encoding.PEM
    return ark.public_bytes(pem), ask.public_bytes(pem), vcek.public_bytes(serialization.Encoding.DER), vcek_k


def _signed(raw: bytearray, key: ec.EllipticCurvePrivateKey) -> bytes:
    r, s = decode_dss_signature(key.sign(bytes(raw[:SIGNED_SIZE]), ec.ECDSA(hashes.SHA384())))
    raw[SIGNED_SIZE : SIGNED_SIZE + 144] = r.to_bytes(72, "little") + s.to_bytes(72, "little")
    return bytes(raw)


CHIP, TCB = RAW[0x1A0:0x1E0], RAW[0x180:0x188]


def test_our_chain_with_amds_names_is_refused_while_amds_ark_is_pinned_and_holds_when_pinned():
    ark, ask, vcek, k = _chain(CHIP, TCB)
    raw = _signed(bytearray(RAW), k)
    with pytest.raises(SnpRefused, match="not AMD's root"):
        verify_report(raw, vcek, ask, ark, AMD_ARK)
    assert verify_report(raw, vcek, ask, ark, ark).chip_id == CHIP  # the checks below are reached past the chain


def test_a_debuggable_guest_is_refused_unless_allowed():
    ark, ask, vcek, k = _chain(CHIP, TCB)
    raw = bytearray(RAW)
    raw[0x08:0x10] = (int.from_bytes(RAW[0x08:0x10], "little") | POLICY_DEBUG).to_bytes(8, "little")
    raw = _signed(raw, k)
    with pytest.raises(SnpRefused, match="allows debugging"):
        verify_report(raw, vcek, ask, ark, ark)
    assert verify_report(raw, vcek, ask, ark, ark, allow_debug=True).policy & POLICY_DEBUG


def test_a_vcek_of_another_chip_or_an_older_tcb_is_refused():
    other = bytes(64 - 1) + b"\x01"
    ark, ask, vcek, k = _chain(other, TCB)  # the VCEK AMD issued for another chip signs this chip's report
    with pytest.raises(SnpRefused, match="another chip"):
        verify_report(_signed(bytearray(RAW), k), vcek, ask, ark, ark)
    older = bytearray(TCB)
    older[7] -= 1  # microcode one before the report's: the VCEK of a TCB the platform has moved past
    ark, ask, vcek, k = _chain(CHIP, bytes(older))
    with pytest.raises(SnpRefused, match="another TCB"):
        verify_report(_signed(bytearray(RAW), k), vcek, ask, ark, ark)
    newer = bytearray(TCB)
    newer[6] += 1  # and an SNP firmware the report does not claim
    ark, ask, vcek, k = _chain(CHIP, bytes(newer))
    with pytest.raises(SnpRefused, match="another TCB"):
        verify_report(_signed(bytearray(RAW), k), vcek, ask, ark, ark)
