"""P-256 key wrapping to a TPM-resident key, and TPM2_Quote verification (no TPM needed here).

Wrapping is `codec.wrap`'s ECIES with NIST P-256 in place of X25519 (TPMs do not do X25519):
an ephemeral P-256 key agrees Z with the recipient's public key (SP 800-56A §5.7.1.2, the x
coordinate), HKDF-SHA256 (RFC 5869) derives a one-time AES-256 key bound to both public points
and the context, and AES-GCM seals the secret with the context as associated data. Unwrapping
takes `zgen`, the ECDH half, so the private key can stay inside the chip (TPM2_ECDH_ZGen).

A quote is TPMS_ATTEST (TPM 2.0 Part 2 §10.12.12) signed by the attestation key with
ECDSA-SHA256 over the marshalled bytes. `verify_quote` checks, in order: the signer is the
registered AK, the signature, the magic and type, extraData (the caller's nonce digest), the PCR
selection and the PCR digest (SHA-256 of the selected values, Part 3 §18.4), and returns the
clock info so a caller can refuse a reset count that went backwards.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .codec import VaultError, b64d, b64e

WRAP_ALG = "P256-HKDF-SHA256-A256GCM"
TPM_GENERATED = 0xFF544347  # TPM_GENERATED_VALUE, Part 2 §6.2
ST_ATTEST_QUOTE = 0x8018  # TPM_ST_ATTEST_QUOTE, Part 2 §6.9
ALG_SHA256 = 0x000B
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


class QuoteRefused(VaultError):
    """A quote that does not hold; `code` names the check (bad_quote, stale_quote, pcr_mismatch, unknown_ak)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def p256_public(der_hex: Any, what: str = "TPM public key") -> ec.EllipticCurvePublicKey:
    key = _p256_or_none(der_hex) if isinstance(der_hex, str) else None
    if key is None:
        raise VaultError(f"{what} is not a DER public key in hex, or not an ECC P-256 key")
    return key


@functools.lru_cache(maxsize=4096)
def _p256_or_none(der_hex: str) -> ec.EllipticCurvePublicKey | None:
    """Parsed once per key: the key server meets the same AKs and unwrap keys at every renewal."""
    try:
        key = serialization.load_der_public_key(bytes.fromhex(der_hex))
    except ValueError:
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return None
    return key


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


@functools.lru_cache(maxsize=4096)
def _recipient(der_hex: str) -> tuple[ec.EllipticCurvePublicKey, bytes]:
    """A chip's unwrap key and its point, made once: the key server wraps to the same keys at every renewal."""
    key = p256_public(der_hex)
    return key, _point(key)


def _wrap_key(z: bytes, epk: bytes, rpk: bytes, context: bytes) -> bytes:
    hk = HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + rpk, info=b"codemoat-wrap-p256-v1\x00" + context)
    return hk.derive(z)


def wrap_p256(recipient_der_hex: str, secret: bytes, context: bytes) -> dict[str, str]:
    """Encrypt `secret` so that only the chip holding `recipient`'s private key can read it."""
    return wrap_p256_shared(recipient_der_hex, [(secret, context)])[0]


def wrap_p256_shared(recipient_der_hex: str, items: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    """`wrap_p256` of each (secret, context) with ONE ephemeral key, so the chip computes Z once for all of them
    (one TPM2_ECDH_ZGen per start, not one per key). Each key still has its own one-time AES key: HKDF's info
    carries its context, which differs per item (it names the key's purpose), and its own random nonce. Z alone
    opens nothing without the context, and whoever can have the chip compute Z for one of them can for all of
    them anyway (the same key, the same policy), so sharing the point adds nothing an attacker lacked."""
    contexts = [ctx for _, ctx in items]
    if len(set(contexts)) != len(contexts):
        raise VaultError("keys wrapped to one ephemeral point need distinct contexts")
    rcpt, rpk = _recipient(recipient_der_hex)
    eph = ec.generate_private_key(ec.SECP256R1())
    epk, z = _point(eph.public_key()), eph.exchange(ec.ECDH(), rcpt)
    out = []
    for secret, context in items:
        nonce = os.urandom(12)
        ct = AESGCM(_wrap_key(z, epk, rpk, context)).encrypt(nonce, secret, context)
        out.append({"alg": WRAP_ALG, "epk": b64e(epk), "nonce": b64e(nonce), "ct": b64e(ct)})
    return out


def unwrap_p256(zgen: Callable[[bytes], bytes], recipient_der_hex: str, wrapped: Any, context: bytes, what: str) -> bytes:
    """Inverse of `wrap_p256`, with the ECDH half (`zgen(ephemeral point) -> Z`) done by the chip."""
    if not isinstance(wrapped, dict) or wrapped.get("alg") != WRAP_ALG:
        raise VaultError(f"{what}: not wrapped to a TPM key")
    epk = b64d(wrapped.get("epk"), f"{what} epk")
    nonce = b64d(wrapped.get("nonce"), f"{what} nonce")
    ct = b64d(wrapped.get("ct"), f"{what} ciphertext")
    if len(epk) != 65 or epk[0] != 4 or len(nonce) != 12:
        raise VaultError(f"{what}: malformed wrapped key")
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), epk)  # on the curve, before the chip sees it
    except ValueError:
        raise VaultError(f"{what}: malformed wrapped key") from None
    k = _wrap_key(zgen(epk), epk, _point(p256_public(recipient_der_hex)), context)
    try:
        return AESGCM(k).decrypt(nonce, ct, context)
    except InvalidTag:
        raise VaultError(f"{what}: cannot be unwrapped with this TPM's key") from None


@dataclass(frozen=True)
class QuoteInfo:
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    pcr_select: list[tuple[int, bytes]]
    pcr_digest: bytes
    # TPMS_CLOCK_INFO.safe (Part 2 §10.11.1): NO when the chip may have reported a higher clock
    # before (it lost power before saving the clock to NV), so this clock alone does not order it.
    safe: bool = True


@dataclass(frozen=True)
class AttestHeader:
    """The common part of a TPMS_ATTEST (Part 2 §10.12.12), up to firmwareVersion; `off` is where
    the type-specific part (attested) starts."""

    magic: int
    type: int
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    off: int


def parse_quote(attest: bytes) -> QuoteInfo:
    """TPMS_ATTEST of a quote, field by field; anything else (or trailing bytes) is refused."""
    h = _header(attest, "quote")
    magic, typ, extra, off = h.magic, h.type, h.extra_data, h.off
    try:
        (count,) = struct.unpack_from(">I", attest, off)
        off += 4
        sel = []
        for _ in range(min(count, 16)):
            alg, size = struct.unpack_from(">HB", attest, off)
            sel.append((alg, attest[off + 3 : off + 3 + size]))
            off += 3 + size
        (n,) = struct.unpack_from(">H", attest, off)
        digest = attest[off + 2 : off + 2 + n]
        off += 2 + n
    except struct.error:
        raise QuoteRefused("bad_quote", "quote is truncated") from None
    if magic != TPM_GENERATED or typ != ST_ATTEST_QUOTE or count > 16 or off != len(attest) or len(extra) > 64:
        raise QuoteRefused("bad_quote", "quote is not a TPM-generated quote")
    return QuoteInfo(extra, h.clock, h.reset_count, h.restart_count, sel, digest, h.safe)


def pcr_bitmap(pcrs: list[int]) -> bytes:
    bits = bytearray(3)
    for p in pcrs:
        bits[p // 8] |= 1 << (p % 8)
    return bytes(bits)


def quote_json(ak: str, q: Any) -> dict[str, Any]:
    """A quote (`attest.base.Quote`) as a lease request carries it: what `verify_quote` reads."""
    out = {"ak": ak, "attest": b64e(q.attest), "r": b64e(q.r), "s": b64e(q.s)}
    if q.latch is not None:  # the tamper latch's count: refused after a tamper event, a reboot or not
        out["latch"] = {"attest": b64e(q.latch.attest), "r": b64e(q.latch.r), "s": b64e(q.latch.s)}
    return out


def verify_quote(tpm: dict[str, Any], quote: Any, expected_data: bytes) -> QuoteInfo:
    """The quote in a request, checked against the machine's registered TPM entry (AK and policy)."""
    if not isinstance(quote, dict) or not all(isinstance(quote.get(k), str) for k in ("ak", "attest", "r", "s")):
        raise QuoteRefused("bad_quote", "request carries no TPM quote (this license is bound to a TPM)")
    if quote["ak"] != tpm.get("ak"):
        raise QuoteRefused("unknown_ak", "quote is signed by an attestation key not registered for this license")
    try:  # a proxy may edit the quote (it is the TPM's, not under the machine's signature): a signed refusal, not a 500
        attest = b64d(quote["attest"], "quote")
        r, s = b64d(quote["r"], "quote signature r"), b64d(quote["s"], "quote signature s")
    except VaultError as e:
        raise QuoteRefused("bad_quote", str(e)) from None
    _verify_signature(tpm["ak"], attest, r, s, "quote")
    info = parse_quote(attest)
    if info.extra_data != expected_data:
        raise QuoteRefused("stale_quote", "quote is not over this request's nonce (stale or replayed)")
    policy = tpm["policy"]
    if info.pcr_select != [(ALG_SHA256, pcr_bitmap(policy["pcrs"]))]:
        raise QuoteRefused("pcr_mismatch", f"quote covers other PCRs than the license's policy {policy['pcrs']}")
    if info.pcr_digest.hex() != policy["digest"]:
        raise QuoteRefused(
            "pcr_mismatch",
            f"PCRs {policy['pcrs']} differ from the values recorded at provisioning "
            "(tamper event or another boot state): the vendor must reprovision",
        )
    if policy.get("latch") is not None:
        _check_latch(tpm["ak"], quote.get("latch"), expected_data, policy["latch"])
    return info


def _check_latch(ak_der_hex: str, cert: Any, expected_data: bytes, latch: dict[str, Any]) -> None:
    """The AK's TPM2_NV_Certify of the tamper latch over the request's data must show the count recorded at
    provisioning. A reboot resets the tamper PCR, so a quote alone would hold again after one; the latch's
    NV counter survives it (and only counts up), so the key server still sees the event and refuses."""
    if not isinstance(cert, dict) or not all(isinstance(cert.get(k), str) for k in ("attest", "r", "s")):
        raise QuoteRefused(
            "bad_quote",
            "request carries no certification of the TPM's tamper latch, which this license's policy names "
            "(the latch was deleted from the chip, or the client predates it)",
        )
    what = "tamper latch certification"
    try:
        attest, r, s = b64d(cert["attest"], what), b64d(cert["r"], f"{what} r"), b64d(cert["s"], f"{what} s")
    except VaultError as e:
        raise QuoteRefused("bad_quote", str(e)) from None
    count = verify_nv_certify(ak_der_hex, attest, r, s, expected_data, latch["index"], what).counter
    if count != latch["count"]:
        raise QuoteRefused(
            "tampered",
            f"the TPM's tamper latch has counted {count - latch['count']} tamper event(s) since provisioning "
            f"(count {count}, provisioned {latch['count']}; a reboot does not clear it): the vendor must reprovision",
        )


ST_ATTEST_NV = 0x8014  # TPM_ST_ATTEST_NV, Part 2 §6.9
# TPMA_NV (Part 2 §13.4) of the audit counter as the chip reports it once incremented: AUTHWRITE,
# TPM_NT_COUNTER, AUTHREAD, NO_DA, WRITTEN. Its name is what NV_Certify names, so a look-alike
# ordinary index (whose value anyone with owner auth could set back) has another name.
COUNTER_ATTRS = (1 << 2) | (1 << 4) | (1 << 18) | (1 << 25) | (1 << 29)


def counter_name(index: int, written: bool = True) -> bytes:
    """The TPM name (SHA-256 || H(TPMS_NV_PUBLIC)) of codemoat's 8-byte audit counter at `index`
    (before its first increment the chip has not set TPMA_NV_WRITTEN: `written=False`)."""
    attrs = COUNTER_ATTRS if written else COUNTER_ATTRS & ~(1 << 29)
    nv_public = struct.pack(">IHIHH", index, ALG_SHA256, attrs, 0, 8)
    return struct.pack(">H", ALG_SHA256) + hashlib.sha256(nv_public).digest()


@dataclass(frozen=True)
class CounterInfo:
    counter: int
    clock: int
    reset_count: int


def _verify_signature(ak_der_hex: str, attest: bytes, r: bytes, s: bytes, what: str) -> None:
    """The AK's ECDSA-SHA256 signature over a TPMS_ATTEST of bounded size, or `QuoteRefused`."""
    if len(attest) > 1024 or not (0 < len(r) <= 32 and 0 < len(s) <= 32):
        raise QuoteRefused("bad_quote", f"{what} is malformed")
    try:
        p256_public(ak_der_hex, "attestation key").verify(
            encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big")), attest, _ECDSA_SHA256
        )
    except (InvalidSignature, ValueError):
        raise QuoteRefused("bad_quote", f"{what} signature does not verify with the attestation key") from None


def _header(attest: bytes, what: str) -> AttestHeader:
    """The common TPMS_ATTEST header: magic, type, qualifiedSigner (skipped), extraData, clockInfo
    (clock, resetCount, restartCount, safe) and firmwareVersion (skipped)."""
    try:
        magic, typ = struct.unpack_from(">IH", attest, 0)
        off = 6
        (n,) = struct.unpack_from(">H", attest, off)
        off += 2 + n  # qualifiedSigner
        (n,) = struct.unpack_from(">H", attest, off)
        extra = attest[off + 2 : off + 2 + n]
        if len(extra) != n:
            raise struct.error("short extraData")
        off += 2 + n
        clock, reset, restart, safe = struct.unpack_from(">QIIB", attest, off)
        off += 17 + 8  # clockInfo, firmwareVersion
    except struct.error:
        raise QuoteRefused("bad_quote", f"{what} is truncated") from None
    if safe not in (0, 1):  # TPMI_YES_NO
        raise QuoteRefused("bad_quote", f"{what} is not a TPM-generated statement (clockInfo.safe is {safe})")
    return AttestHeader(magic, typ, extra, clock, reset, restart, safe == 1, off)


def _signed_attest(ak_der_hex: str, attest: bytes, r: bytes, s: bytes, what: str) -> tuple[int, int, bytes, int, int, int]:
    """A TPMS_ATTEST signed by the AK, its common header read: (magic, type, extraData, clock,
    resetCount, offset of the type-specific part), or `QuoteRefused` naming `what` failed."""
    _verify_signature(ak_der_hex, attest, r, s, what)
    h = _header(attest, what)
    return h.magic, h.type, h.extra_data, h.clock, h.reset_count, h.off


def verify_nv_certify(
    ak_der_hex: str, attest: bytes, r: bytes, s: bytes, expected_data: bytes, index: int, what: str = "TPM checkpoint"
) -> CounterInfo:
    """A TPM2_NV_Certify of codemoat's NV counter at `index` (the audit counter, the tamper latch) by the AK
    over `expected_data`: the counter's value and the TPM clock, or `QuoteRefused` naming what does not hold."""
    magic, typ, extra, clock, reset, off = _signed_attest(ak_der_hex, attest, r, s, what)
    try:
        (n,) = struct.unpack_from(">H", attest, off)
        name = attest[off + 2 : off + 2 + n]
        off += 2 + n
        (offset, n) = struct.unpack_from(">HH", attest, off)
        contents = attest[off + 4 : off + 4 + n]
        off += 4 + n
    except struct.error:
        raise QuoteRefused("bad_quote", f"{what} is truncated") from None
    if magic != TPM_GENERATED or typ != ST_ATTEST_NV or off != len(attest) or offset != 0 or len(contents) != 8:
        raise QuoteRefused("bad_quote", f"{what} is not a TPM-generated certification of an 8-byte counter")
    if name != counter_name(index):
        raise QuoteRefused("bad_quote", f"{what} certifies another NV index than codemoat's counter {index:#x}")
    if extra != expected_data:
        raise QuoteRefused("stale_quote", f"{what} was signed over another record or request than this one (stale or replayed)")
    return CounterInfo(int.from_bytes(contents, "big"), clock, reset)


ST_ATTEST_CERTIFY = 0x8017  # TPM_ST_ATTEST_CERTIFY, Part 2 §6.9
UNWRAP_CERTIFY_DOMAIN = b"codemoat-tpm-unwrap-certify-v1\x00"


def unwrap_certify_data(unwrap_der_hex: str) -> bytes:
    """The qualifyingData of the AK's TPM2_Certify of the unwrap key: which key, for what."""
    return hashlib.sha256(UNWRAP_CERTIFY_DOMAIN + bytes.fromhex(unwrap_der_hex)).digest()


CRL_CERTIFY_DOMAIN = b"codemoat-tpm-crl-certify-v1\x00"
LATCH_CERTIFY_DOMAIN = b"codemoat-tpm-latch-certify-v1\x00"


def crl_certify_data(ak_der_hex: str, domain: bytes = CRL_CERTIFY_DOMAIN) -> bytes:
    """The qualifyingData of the AK's TPM2_NV_Certify of the CRL counter in a machine identity (`machine-id --tpm`);
    with `LATCH_CERTIFY_DOMAIN`, of the tamper latch."""
    return hashlib.sha256(domain + bytes.fromhex(ak_der_hex)).digest()


def verify_certify(ak_der_hex: str, attest: bytes, r: bytes, s: bytes, expected_data: bytes) -> bytes:
    """A TPM2_Certify by the AK (TPMS_ATTEST of type CERTIFY) over `expected_data`: the certified
    object's name, which the chip signs only for an object loaded in it; else `QuoteRefused`."""
    magic, typ, extra, _clock, _reset, off = _signed_attest(ak_der_hex, attest, r, s, "TPM certification")
    try:
        (n,) = struct.unpack_from(">H", attest, off)
        name = attest[off + 2 : off + 2 + n]
        off += 2 + n
        (n,) = struct.unpack_from(">H", attest, off)
        off += 2 + n  # qualifiedName
    except struct.error:
        raise QuoteRefused("bad_quote", "TPM certification is truncated") from None
    if magic != TPM_GENERATED or typ != ST_ATTEST_CERTIFY or off != len(attest):
        raise QuoteRefused("bad_quote", "TPM certification is not a TPM-generated TPM2_Certify")
    if extra != expected_data:
        raise QuoteRefused("stale_quote", "TPM certification was made for another key")
    return name
