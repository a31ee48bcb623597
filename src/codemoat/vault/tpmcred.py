"""Proving an attestation key lives in the TPM whose EK certificate the vendor trusts (no TPM needed here).

A machine identity names an EK (with the manufacturer's certificate) and an AK. Nothing in the
identity ties the two together: a customer could send a real chip's EK certificate beside a key
made anywhere. TPM 2.0 credential protection (Part 1 §24, TPM2_MakeCredential / Part 3 §12.6
TPM2_ActivateCredential) closes that: the vendor encrypts a secret to the EK, bound to the AK's
*name* (nameAlg || H(TPMT_PUBLIC), which covers the key's attributes: fixedTPM, restricted,
signing); the chip releases the secret only when it holds that EK's private key *and* has the AK
with that name loaded. `make_credential` is the vendor's half, done in software as Part 1 §24.4
describes (seed to the EK by RSA-OAEP or ECDH + KDFe, AES-128-CFB of the secret, an outer HMAC
over the ciphertext and the AK name); `ak_name` checks the AK's public area is a restricted,
fixedTPM ECDSA P-256 signing key equal to the identity's AK; `verify_ek_cert` walks the EK
certificate up to a CA the vendor trusts.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import struct

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.decrepit.ciphers.modes import CFB  # TPM 2.0 credential protection mandates CFB
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from .codec import VaultError

ALG_SHA256, ALG_NULL, ALG_ECC, ALG_ECDSA, CURVE_P256 = 0x000B, 0x0010, 0x0023, 0x0018, 0x0003
# TPMA_OBJECT bits (Part 2 §8.3): what an attestation key must be, and must not be
FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN, RESTRICTED, DECRYPT, SIGN = 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 17, 1 << 18
AK_MUST = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN
USER_WITH_AUTH, ALG_ECDH, TPM_CC_POLICY_PCR = 1 << 6, 0x0019, 0x0000017F
UNWRAP_MUST = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | DECRYPT
MAX_CHAIN = 6


def _tpm2b(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """SP 800-108 counter-mode KDF with HMAC-SHA256, as TPM 2.0 Part 1 §11.4.10.2 frames it."""
    out, i = b"", 1
    while len(out) * 8 < bits:
        out += hmac.new(
            key, struct.pack(">I", i) + label + b"\x00" + context_u + context_v + struct.pack(">I", bits), "sha256"
        ).digest()
        i += 1
    return out[: bits // 8]


def kdfe(z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """SP 800-56A concatenation KDF with SHA-256 (Part 1 §11.4.10.3): the seed of an ECC secret."""
    out, i = b"", 1
    while len(out) * 8 < bits:
        out += hashlib.sha256(struct.pack(">I", i) + z + label + b"\x00" + party_u + party_v).digest()
        i += 1
    return out[: bits // 8]


def _ecc_area(public_hex: str, what: str) -> tuple[bytes, tuple[int, ...], int, bytes, bytes, bytes]:
    """A marshalled ECC TPMT_PUBLIC: (area, (type, nameAlg, sym, scheme, scheme hash, curve, kdf), attrs, authPolicy, x, y)."""
    try:
        area = bytes.fromhex(public_hex)
        typ, name_alg, attrs = struct.unpack_from(">HHI", area, 0)
        off = 8
        (n,) = struct.unpack_from(">H", area, off)
        auth_policy = area[off + 2 : off + 2 + n]
        off += 2 + n  # authPolicy
        sym, scheme = struct.unpack_from(">HH", area, off)  # a restricted decrypt key's sym has more: refused below
        off += 4
        scheme_hash = ALG_NULL
        if scheme != ALG_NULL:  # TPMU_ASYM_SCHEME: a hash follows only a scheme
            (scheme_hash,) = struct.unpack_from(">H", area, off)
            off += 2
        curve, kdf = struct.unpack_from(">HH", area, off)
        off += 4
        if kdf != ALG_NULL:
            raise ValueError("a KDF scheme")
        (n,) = struct.unpack_from(">H", area, off)
        x = area[off + 2 : off + 2 + n]
        off += 2 + n
        (n,) = struct.unpack_from(">H", area, off)
        y = area[off + 2 : off + 2 + n]
        off += 2 + n
    except (TypeError, ValueError, struct.error):
        raise VaultError(f"the TPM {what}'s public area is malformed") from None
    if off != len(area) or len(x) != 32 or len(y) != 32:  # truncated, or bytes after the key
        raise VaultError(f"the TPM {what}'s public area is malformed")
    return area, (typ, name_alg, sym, scheme, scheme_hash, curve, kdf), attrs, auth_policy, x, y


def _same_key(x: bytes, y: bytes, der_hex: str, what: str) -> None:
    point = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1())
    try:
        der = point.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except ValueError:
        raise VaultError(f"the TPM {what} is not on the P-256 curve") from None
    if der.hex() != der_hex:
        raise VaultError(
            f"the TPM {what}'s public area names another key than the identity's {what.replace('attestation key', 'AK')}"
        )


def ak_name(ak_public_hex: str, ak_der_hex: str) -> bytes:
    """The TPM name of the AK whose marshalled TPMT_PUBLIC is `ak_public_hex`, after checking it is
    a restricted, fixedTPM, chip-generated ECDSA-SHA256 P-256 signing key equal to `ak_der_hex`."""
    area, params, attrs, _, x, y = _ecc_area(ak_public_hex, "attestation key")
    if params != (
        ALG_ECC,
        ALG_SHA256,
        ALG_NULL,
        ALG_ECDSA,
        ALG_SHA256,
        CURVE_P256,
        ALG_NULL,
    ):
        raise VaultError("the TPM attestation key is not an ECDSA-SHA256 P-256 key")
    if attrs & AK_MUST != AK_MUST or attrs & DECRYPT:
        raise VaultError("the TPM attestation key is not a restricted signing key that cannot leave its TPM")
    _same_key(x, y, ak_der_hex, "attestation key")
    return struct.pack(">H", ALG_SHA256) + hashlib.sha256(area).digest()


TPM_CC_POLICY_NV, TPM_EO_EQ = 0x00000149, 0x0000


def pcr_policy_digest(policy: dict) -> bytes:
    """The authPolicy TPM2_PolicyPCR(selection, digest) leaves from a fresh session (Part 3 §23.7),
    then TPM2_PolicyNV(tamper latch == its count) when the policy names the latch (Part 3 §23.9:
    H(digest || TPM_CC_PolicyNV || H(operandB || offset || operation) || the NV index's name))."""
    from .tpmwrap import counter_name, pcr_bitmap

    sel = struct.pack(">IHB", 1, ALG_SHA256, 3) + pcr_bitmap(policy["pcrs"])
    d = hashlib.sha256(bytes(32) + struct.pack(">I", TPM_CC_POLICY_PCR) + sel + bytes.fromhex(policy["digest"])).digest()
    latch = policy.get("latch")
    if latch is not None:
        args = hashlib.sha256(latch["count"].to_bytes(8, "big") + struct.pack(">HH", 0, TPM_EO_EQ)).digest()
        d = hashlib.sha256(d + struct.pack(">I", TPM_CC_POLICY_NV) + args + counter_name(latch["index"])).digest()
    return d


def unwrap_name(unwrap_public_hex: str, unwrap_der_hex: str, policy: dict) -> bytes:
    """The TPM name of the unwrap key, after checking its public area is a chip-made, fixedTPM P-256
    decrypt key equal to `unwrap_der_hex` that only TPM2_PolicyPCR over `policy` authorizes."""
    area, params, attrs, auth_policy, x, y = _ecc_area(unwrap_public_hex, "unwrap key")
    typ, name_alg, sym, scheme, _, curve, kdf = params
    if (typ, name_alg, sym, curve, kdf) != (ALG_ECC, ALG_SHA256, ALG_NULL, CURVE_P256, ALG_NULL) or scheme not in (
        ALG_NULL,
        ALG_ECDH,
    ):
        raise VaultError("the TPM unwrap key is not a P-256 ECDH key")
    if attrs & UNWRAP_MUST != UNWRAP_MUST or attrs & (SIGN | RESTRICTED | USER_WITH_AUTH):
        raise VaultError("the TPM unwrap key is not a decrypt key that cannot leave its TPM, used only under its PCR policy")
    if auth_policy != pcr_policy_digest(policy):
        raise VaultError("the TPM unwrap key's policy is not the identity's PCR policy")
    _same_key(x, y, unwrap_der_hex, "unwrap key")
    return struct.pack(">H", ALG_SHA256) + hashlib.sha256(area).digest()


def make_credential(ek_der_hex: str, name: bytes, credential: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software: (TPM2B_ID_OBJECT body, TPM2B_ENCRYPTED_SECRET body) that only
    the TPM holding the EK's private key, with the object called `name` loaded, can open.

    The EK is a low-range TCG template (EK Credential Profile 2.0 §B.3.3, §B.3.4): nameAlg
    SHA-256, symmetric AES-128-CFB, RSA 2048 (OAEP) or ECC P-256."""
    try:
        ek = serialization.load_der_public_key(bytes.fromhex(ek_der_hex))
    except (TypeError, ValueError):
        raise VaultError("the machine's EK is not a DER public key in hex") from None
    if isinstance(ek, rsa.RSAPublicKey) and ek.key_size == 2048:
        seed = os.urandom(32)
        label = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"IDENTITY\x00")
        secret = ek.encrypt(seed, label)
    elif isinstance(ek, ec.EllipticCurvePublicKey) and isinstance(ek.curve, ec.SECP256R1):
        eph = ec.generate_private_key(ec.SECP256R1())
        e, q = eph.public_key().public_numbers(), ek.public_numbers()
        ex, ey, qx = e.x.to_bytes(32, "big"), e.y.to_bytes(32, "big"), q.x.to_bytes(32, "big")
        seed = kdfe(eph.exchange(ec.ECDH(), ek), b"IDENTITY", ex, qx, 256)
        secret = _tpm2b(ex) + _tpm2b(ey)  # TPMS_ECC_POINT
    else:
        raise VaultError("the machine's EK is neither RSA 2048 nor ECC P-256 (a TCG low-range EK template)")
    sym = kdfa(seed, b"STORAGE", name, b"", 128)
    enc = Cipher(algorithms.AES(sym), CFB(bytes(16))).encryptor()
    enc_identity = enc.update(_tpm2b(credential)) + enc.finalize()
    outer = hmac.new(kdfa(seed, b"INTEGRITY", b"", b"", 256), enc_identity + name, "sha256").digest()
    return _tpm2b(outer) + enc_identity, secret


def load_ca_bundle(pem: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise VaultError("the trusted EK CA file holds no PEM certificates") from None
    return certs


# Extensions this check understands or may ignore (RFC 5280 §4.2; TCG EK Credential Profile §3.2):
# any other marked critical makes the certificate unusable, as RFC 5280 requires.
_KNOWN_CRITICAL = {
    x509.ExtensionOID.BASIC_CONSTRAINTS,
    x509.ExtensionOID.KEY_USAGE,
    x509.ExtensionOID.SUBJECT_ALTERNATIVE_NAME,  # critical in EK certificates, whose subject is empty
    x509.ExtensionOID.EXTENDED_KEY_USAGE,
    x509.ExtensionOID.CERTIFICATE_POLICIES,
    x509.ExtensionOID.SUBJECT_DIRECTORY_ATTRIBUTES,
    x509.ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    x509.ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    x509.ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
    x509.ExtensionOID.CRL_DISTRIBUTION_POINTS,
}


def _known_critical(cert: x509.Certificate) -> None:
    for ext in cert.extensions:
        if ext.critical and ext.oid not in _KNOWN_CRITICAL:
            raise VaultError(
                f"the EK certificate chain has a critical extension this vendor does not understand ({ext.oid.dotted_string} "
                f"in {cert.subject.rfc4514_string() or 'the EK certificate'}): refused, as RFC 5280 requires"
            )


def verify_ek_cert(ek_cert_hex: str | None, ek_der_hex: str, cas: list[x509.Certificate]) -> x509.Certificate:
    """The EK certificate, once it names the EK and chains (signatures, validity, CA flags) to a
    self-signed certificate in `cas` (the TPM manufacturers' roots and intermediates the vendor trusts),
    with no critical extension it does not understand and issuers whose keyUsage allows keyCertSign.
    Revocation (CRLs) is not checked."""
    if not ek_cert_hex:
        raise VaultError("the machine's TPM has no EK certificate: nothing proves it is a manufacturer's TPM")
    try:
        cert = x509.load_der_x509_certificate(bytes.fromhex(ek_cert_hex))
        spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except (TypeError, ValueError):
        raise VaultError("the machine's EK certificate is not a DER X.509 certificate") from None
    if spki.hex() != ek_der_hex:
        raise VaultError("the machine's EK certificate names another key than its EK")
    now = datetime.datetime.now(datetime.UTC)
    cur = cert
    for _ in range(MAX_CHAIN):
        if not cur.not_valid_before_utc <= now <= cur.not_valid_after_utc:
            raise VaultError(f"the EK certificate chain has a certificate outside its validity ({cur.subject.rfc4514_string()})")
        _known_critical(cur)
        issuer = None
        for ca in cas:
            if ca.subject != cur.issuer:
                continue
            try:
                cur.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            issuer = ca
            break
        if issuer is None:
            raise VaultError("the machine's EK certificate does not chain to a TPM manufacturer CA this vendor trusts")
        try:
            bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise VaultError(f"the EK certificate chain names an issuer that is not a CA ({issuer.subject.rfc4514_string()})")
        _known_critical(issuer)
        try:
            ku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            ku = None
        if ku is not None and not ku.key_cert_sign:  # RFC 5280 §4.2.1.3: a key that may not sign certificates
            raise VaultError(
                f"the EK certificate chain names an issuer whose key may not sign certificates ({issuer.subject.rfc4514_string()})"
            )
        if issuer.subject == issuer.issuer:
            if not issuer.not_valid_before_utc <= now <= issuer.not_valid_after_utc:
                raise VaultError("the trusted EK root certificate is outside its validity")
            return cert
        cur = issuer
    raise VaultError("the EK certificate chain is too long")
