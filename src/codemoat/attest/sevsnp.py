"""Verifying an AMD SEV-SNP attestation report (no SNP hardware needed): the first confidential-computing verifier.

An SNP guest asks its AMD secure processor for a report (SEV-SNP ABI spec 56860, Table 22,
ATTESTATION_REPORT, 1184 bytes, little-endian): the guest's launch `measurement` (0x90, 48 bytes),
64 bytes of `report_data` it chose (0x50: a key server puts its nonce there), the guest `policy`
(0x08), the `reported_tcb` (0x180), the `chip_id` (0x1A0), and an ECDSA P-384 / SHA-384 signature
(0x2A0: r and s, 72 bytes each, little-endian) over bytes 0..0x29F by the chip's VCEK. The VCEK
certificate (AMD KDS) is signed by the ASK, the ASK by the ARK (RSA-PSS); the ARK is AMD's root,
pinned by the verifier. `verify_report` checks, in order: size, version and signature algorithm;
the chain (ARK self-signed and the pinned one, ASK by ARK, VCEK by ASK, each in its validity);
the report's signature with the VCEK; that the VCEK names this chip (`hwID` extension = chip_id)
and this TCB (its bootloader/TEE/SNP/microcode extensions = reported_tcb); that the guest policy
forbids debugging; and then the caller's `report_data` and `measurement`. Anything else: one line.
"""

from __future__ import annotations

import datetime
import struct
import warnings
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from .base import AttestError

REPORT_SIZE, SIGNED_SIZE = 1184, 0x2A0
SIG_ALGO_ECDSA_P384_SHA384 = 1
POLICY_DEBUG = 1 << 19  # the guest may be debugged by the hypervisor: its memory is not confidential
_OID = "1.3.6.1.4.1.3704.1."  # AMD's VCEK extensions (KDS spec 57230 §3.1)
HWID_OID = _OID + "4"
# reported_tcb bytes: [0] bootloader, [1] TEE, [2..5] reserved, [6] SNP, [7] microcode
TCB_OIDS = {0: _OID + "3.1", 1: _OID + "3.2", 6: _OID + "3.3", 7: _OID + "3.8"}


class SnpRefused(AttestError):
    """An SNP report that does not hold; the message names the check."""


@dataclass(frozen=True)
class SnpReport:
    version: int
    policy: int
    report_data: bytes
    measurement: bytes
    reported_tcb: bytes
    chip_id: bytes


def parse_report(raw: bytes) -> SnpReport:
    if len(raw) != REPORT_SIZE:
        raise SnpRefused(f"an SNP attestation report is {REPORT_SIZE} bytes, not {len(raw)}")
    version, _svn, policy = struct.unpack_from("<IIQ", raw, 0)
    (algo,) = struct.unpack_from("<I", raw, 0x34)
    if version < 2 or algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise SnpRefused(f"SNP report version {version} / signature algorithm {algo} is not one this verifier knows")
    return SnpReport(version, policy, raw[0x50:0x90], raw[0x90:0xC0], raw[0x180:0x188], raw[0x1A0:0x1E0])


def _int_ext(cert: x509.Certificate, oid: str) -> int | None:
    try:
        der = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value.value
    except x509.ExtensionNotFound:
        return None
    if len(der) < 3 or der[0] != 0x02 or der[1] != len(der) - 2:  # a DER INTEGER, short form
        return None
    return int.from_bytes(der[2:], "big")


def _chain(vcek: x509.Certificate, ask: x509.Certificate, ark: x509.Certificate, trusted_ark: x509.Certificate) -> None:
    if ark.fingerprint(hashes.SHA256()) != trusted_ark.fingerprint(hashes.SHA256()):
        raise SnpRefused("the ARK is not AMD's root this verifier pins")
    now = datetime.datetime.now(datetime.UTC)
    for cert, issuer, what in ((ark, ark, "ARK"), (ask, ark, "ASK"), (vcek, ask, "VCEK")):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise SnpRefused(f"the {what} certificate is outside its validity")
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise SnpRefused(f"the {what} certificate is not signed by the {'ARK' if what != 'VCEK' else 'ASK'}") from None


def verify_report(
    raw: bytes,
    vcek_der: bytes,
    ask_pem: bytes,
    ark_pem: bytes,
    trusted_ark_pem: bytes,
    *,
    report_data: bytes | None = None,
    measurement: bytes | None = None,
    allow_debug: bool = False,
) -> SnpReport:
    """The report's fields, once every check holds (see the module's docstring); else `SnpRefused`."""
    rep = parse_report(raw)
    try:
        with warnings.catch_warnings():  # AMD's VCEK certificates carry serial number 0 (RFC 5280 wants > 0)
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            vcek = x509.load_der_x509_certificate(vcek_der)
        ask = x509.load_pem_x509_certificate(ask_pem)
        ark = x509.load_pem_x509_certificate(ark_pem)
        trusted = x509.load_pem_x509_certificate(trusted_ark_pem)
    except ValueError:
        raise SnpRefused("an SNP certificate (VCEK, ASK or ARK) cannot be parsed") from None
    _chain(vcek, ask, ark, trusted)
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise SnpRefused("the VCEK is not an ECC P-384 key")
    r = int.from_bytes(raw[SIGNED_SIZE : SIGNED_SIZE + 72], "little")
    s = int.from_bytes(raw[SIGNED_SIZE + 72 : SIGNED_SIZE + 144], "little")
    try:
        key.verify(encode_dss_signature(r, s), raw[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise SnpRefused("the SNP report's signature does not verify with the VCEK") from None
    if raw[SIGNED_SIZE + 144 :].strip(b"\x00"):
        raise SnpRefused("the SNP report's signature field carries bytes after (r, s)")
    try:
        hwid = vcek.extensions.get_extension_for_oid(x509.ObjectIdentifier(HWID_OID)).value.value
    except x509.ExtensionNotFound:
        hwid = None
    if hwid is None or (hwid != rep.chip_id and hwid[-64:] != rep.chip_id):
        raise SnpRefused("the VCEK certificate is for another chip than the report's chip_id")
    for i, oid in TCB_OIDS.items():
        if _int_ext(vcek, oid) != rep.reported_tcb[i]:
            raise SnpRefused("the VCEK certificate is for another TCB than the report's reported_tcb")
    if rep.policy & POLICY_DEBUG and not allow_debug:
        raise SnpRefused("the guest policy allows debugging: its memory is open to the hypervisor")
    if report_data is not None and rep.report_data != report_data.ljust(64, b"\x00"):
        raise SnpRefused("the SNP report is not over this request's nonce (report_data differs)")
    if measurement is not None and rep.measurement != measurement:
        raise SnpRefused("the guest's launch measurement is not the expected one")
    return rep
