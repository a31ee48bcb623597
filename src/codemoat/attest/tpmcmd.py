"""The TPM 2.0 commands of an unwrap, marshalled here (TPM 2.0 Part 3) and sent through the TCTI.

tpm2-tss 3.2.1's ESAPI makes a fresh OpenSSL library context for every hash and nonce it computes (a
command's cpHash and rpHash, a session's nonceCaller, an object's or NV index's name): OpenSSL then loads
every legacy algorithm name (OBJ_NAME_do_all) and seeds a new DRBG each time. Measured on a 2-core
machine with swtpm: 2.0 ms of client CPU per TPM2_ECDH_ZGen under a policy session, 0.4-0.9 ms per
CreatePrimary, StartAuthSession or NV index looked up, against 0.04 ms for a command that computes
nothing. An offline start sends a dozen of these commands, so the TPM cost it ~8 ms of CPU (bench/attest.py).

The commands here carry no HMAC key: the password session with the empty authValue (the NV counters and
the endorsement hierarchy, as `TpmAttestor` uses them) and an unsalted, unbound policy session whose
policy has no TPM2_PolicyAuthValue, whose HMAC the TPM does not check (Part 1 §19.6). The session crypto
ESAPI would add proves nothing for them; the chip's policy check is what guards the key. So they are sent
as bytes, and nothing else in codemoat is: the quote, the certifications, NV definition and increments
stay on ESAPI.
"""

from __future__ import annotations

import functools
import os
import struct
from typing import Any

from .base import AttestError

ST_NO_SESSIONS, ST_SESSIONS = 0x8001, 0x8002  # TPM_ST, Part 2 §6.9
RH_NULL, RH_ENDORSEMENT, RS_PW = 0x40000007, 0x4000000B, 0x40000009  # Part 2 §7.4
ALG_NULL, ALG_SHA256 = 0x0010, 0x000B
SE_POLICY = 0x01
EO_EQ = 0x0000  # TPM_EO_EQ, Part 2 §6.8
CC_NV_READ = 0x14E
CC_POLICY_NV = 0x149
CC_CREATE_PRIMARY = 0x131
CC_ECDH_ZGEN = 0x154
CC_FLUSH_CONTEXT = 0x165
CC_NV_READ_PUBLIC = 0x169
CC_START_AUTH_SESSION = 0x176
CC_POLICY_PCR = 0x17F
CC_READ_PUBLIC = 0x173
CC_NV_CERTIFY = 0x184
ALG_ECDSA = 0x0018
RC_NV_UNINITIALIZED = 0x14A
RC_PCR_CHANGED = 0x128  # a PCR was extended between TPM2_PolicyPCR and the session's use
# TPM_RC_YIELDED, TPM_RC_TESTING, TPM_RC_RETRY (Part 2 §6.6.3): the chip did not run the command (a self-test after
# a start-up, say); ESAPI sends it again up to 5 times in all (tpm2-tss _ESYS_MAX_SUBMISSIONS).
_RC_AGAIN, _SUBMISSIONS = (0x908, 0x90A, 0x922), 5
_PW = struct.pack(">IHBH", RS_PW, 0, 0, 0)  # TPMS_AUTH_COMMAND: the password session, empty auth


class TpmRc(AttestError):
    """The TPM answered with a response code other than TPM_RC_SUCCESS (one line, as every AttestError)."""

    def __init__(self, cc: int, rc: int):
        super().__init__(f"TPM command {cc:#x} failed with response code {rc:#x}")
        self.rc = rc


def tpm2b(data: bytes) -> bytes:
    """A TPM2B: 2-byte size, then the bytes."""
    return struct.pack(">H", len(data)) + data


# The unwrap key's objectAttributes (Part 2 §8.3): fixedTPM, fixedParent, sensitiveDataOrigin, decrypt; no userWithAuth
# (only its policy authorizes it), not restricted.
UNWRAP_ATTRS = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 17)
ALG_ECC, ECC_NIST_P256 = 0x0023, 0x0003


@functools.lru_cache(maxsize=64)
def unwrap_template(auth_policy: bytes) -> bytes:
    """The unwrap key's TPMT_PUBLIC template up to its unique field (empty x and y follow): an ECC P-256 decryption
    key with `auth_policy`, no symmetric algorithm, scheme or KDF of its own (Part 2 §12.2.3.6, §12.2.4)."""
    return (
        struct.pack(">HHI", ALG_ECC, ALG_SHA256, UNWRAP_ATTRS)
        + tpm2b(auth_policy)
        + struct.pack(">HHHH", ALG_NULL, ALG_NULL, ECC_NIST_P256, ALG_NULL)
    )


# The attestation key's (TpmAttestor._ak): fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, restricted, sign.
AK_ATTRS = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 16) | (1 << 18)
# Its TPMT_PUBLIC template up to the unique field: ECC P-256, no policy, ECDSA-SHA256, no symmetric algorithm or KDF.
AK_TEMPLATE = (
    struct.pack(">HHI", ALG_ECC, ALG_SHA256, AK_ATTRS)
    + tpm2b(b"")
    + struct.pack(">HHHHH", ALG_NULL, ALG_ECDSA, ALG_SHA256, ECC_NIST_P256, ALG_NULL)
)


def ecc_der(head: bytes, area: bytes) -> str:
    """The DER (hex) of the P-256 key whose TPMT_PUBLIC `area` the chip made from the template `head`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        if not area.startswith(head):
            raise ValueError
        x, off = _take_b(area, len(head))
        y, off = _take_b(area, off)
        if off != len(area) or len(x) > 32 or len(y) > 32:
            raise ValueError
        key = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()).public_key()
    except (ValueError, struct.error):
        raise AttestError("the TPM made an unwrap key other than its template asked for, or not a P-256 point") from None
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo).hex()


def _take_b(buf: bytes, off: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from(">H", buf, off)
    if off + 2 + n > len(buf):
        raise struct.error("TPM2B runs past the response")
    return buf[off + 2 : off + 2 + n], off + 2 + n


class Commands:
    """Commands on an open TCTI (`tpm2_pytss.TCTI`: the one ESAPI uses; ESAPI must not be mid-command)."""

    def __init__(self, tcti: Any):
        self.tcti = tcti

    def call(self, cc: int, handles: tuple[int, ...] = (), sessions: tuple[bytes, ...] = (), params: bytes = b"", out: int = 0):
        """Send one command; (its `out` response handles, its response parameters), or `TpmRc`."""
        body = b"".join(struct.pack(">I", h) for h in handles)
        if sessions:
            auth = b"".join(sessions)
            body += struct.pack(">I", len(auth)) + auth
        body += params
        command = struct.pack(">HII", ST_SESSIONS if sessions else ST_NO_SESSIONS, 10 + len(body), cc) + body
        for _ in range(_SUBMISSIONS):  # a command answered "not now" was not run: sent again, as ESAPI does
            self.tcti.transmit(command)
            resp = self.tcti.receive()
            tag, size, rc = struct.unpack_from(">HII", resp)
            if rc not in _RC_AGAIN:
                break
        if rc != 0:
            raise TpmRc(cc, rc)
        if size != len(resp):
            raise TpmRc(cc, -1)
        got = list(struct.unpack_from(f">{out}I", resp, 10))
        off = 10 + 4 * out
        if tag == ST_SESSIONS:  # parameterSize, parameters, then the session's response area (not read: no HMAC key)
            (n,) = struct.unpack_from(">I", resp, off)
            return got, resp[off + 4 : off + 4 + n]
        return got, resp[off:]

    def nv_read_public(self, index: int) -> bytes:
        """TPM2_NV_ReadPublic: the index's name (TpmRc when the chip has no such index)."""
        _, p = self.call(CC_NV_READ_PUBLIC, (index,))
        _, off = _take_b(p, 0)
        return _take_b(p, off)[0]

    def nv_read(self, index: int, size: int) -> bytes:
        """TPM2_NV_Read of an index whose own (empty) authValue reads it."""
        _, p = self.call(CC_NV_READ, (index, index), (_PW,), struct.pack(">HH", size, 0))
        return _take_b(p, 0)[0]

    def create_primary(self, hierarchy: int, public: bytes) -> tuple[int, bytes]:
        """TPM2_CreatePrimary from `public` (a marshalled TPM2B_PUBLIC template): (handle, outPublic's TPMT_PUBLIC)."""
        sensitive = tpm2b(tpm2b(b"") + tpm2b(b""))  # TPM2B_SENSITIVE_CREATE: empty userAuth, no data
        (h,), p = self.call(CC_CREATE_PRIMARY, (hierarchy,), (_PW,), sensitive + public + tpm2b(b"") + struct.pack(">I", 0), 1)
        return h, _take_b(p, 0)[0]

    def read_public(self, handle: int) -> bytes:
        """TPM2_ReadPublic of a loaded or persistent object: its TPMT_PUBLIC (TpmRc when nothing is at `handle`)."""
        _, p = self.call(CC_READ_PUBLIC, (handle,))
        return _take_b(p, 0)[0]

    def nv_certify(self, key: int, index: int, data: bytes, size: int) -> tuple[bytes, bytes, bytes]:
        """TPM2_NV_Certify by the ECDSA signing `key` (empty authValue) of `size` bytes of the NV index (read with its
        own empty authValue) over `data`: (TPMS_ATTEST, r, s)."""
        params = tpm2b(data) + struct.pack(">HHH", ALG_NULL, size, 0)
        _, p = self.call(CC_NV_CERTIFY, (key, index, index), (_PW, _PW), params)
        attest, off = _take_b(p, 0)
        alg, _hash = struct.unpack_from(">HH", p, off)
        if alg != ALG_ECDSA:
            raise struct.error("not an ECDSA signature")
        r, off = _take_b(p, off + 4)
        return attest, r, _take_b(p, off)[0]

    def start_policy_session(self) -> int:
        """TPM2_StartAuthSession: an unsalted, unbound SHA-256 policy session, no parameter encryption."""
        params = tpm2b(os.urandom(32)) + tpm2b(b"") + struct.pack(">BHH", SE_POLICY, ALG_NULL, ALG_SHA256)
        (h,), _ = self.call(CC_START_AUTH_SESSION, (RH_NULL, RH_NULL), (), params, 1)
        return h

    def policy_pcr(self, session: int, bitmap: bytes) -> None:
        """TPM2_PolicyPCR over the SHA-256 bank's PCRs in `bitmap` at their current values."""
        self.call(CC_POLICY_PCR, (session,), (), tpm2b(b"") + struct.pack(">IHB", 1, ALG_SHA256, len(bitmap)) + bitmap)

    def policy_nv(self, session: int, index: int, operand: bytes) -> None:
        """TPM2_PolicyNV: the index (read with its own empty authValue) equals `operand` from offset 0."""
        self.call(CC_POLICY_NV, (index, index, session), (_PW,), tpm2b(operand) + struct.pack(">HH", 0, EO_EQ))

    def ecdh_zgen(self, key: int, session: int, point: bytes, keep: bool) -> bytes:
        """TPM2_ECDH_ZGen of `key` with an uncompressed P-256 `point`, authorized by the policy `session`; the x
        coordinate, 32 bytes. `keep`: continueSession (else the chip ends the session when the command succeeds)."""
        auth = struct.pack(">I", session) + tpm2b(os.urandom(16)) + bytes([1 if keep else 0]) + tpm2b(b"")
        _, p = self.call(CC_ECDH_ZGEN, (key,), (auth,), tpm2b(tpm2b(point[1:33]) + tpm2b(point[33:65])))
        outer, _ = _take_b(p, 0)
        return _take_b(outer, 0)[0].rjust(32, b"\x00")

    def flush(self, handle: int) -> None:
        """TPM2_FlushContext of a transient object or a session."""
        self.call(CC_FLUSH_CONTEXT, (), (), struct.pack(">I", handle))
