"""Small, shared encodings and key recipes for the vault: canonical JSON, base64, key files, key wrapping.

Key wrapping is ECIES in the usual shape (RFC 7748 X25519, RFC 5869 HKDF-SHA256, AES-256-GCM):
an ephemeral X25519 key agrees a secret with the recipient's public key, HKDF turns it into a
one-time AES key bound to both public keys and to a context string, and AES-GCM seals the payload
with that context as associated data, so a wrapped key cannot be moved to another field or license.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import CodemoatError

WRAP_ALG = "X25519-HKDF-SHA256-A256GCM"


class VaultError(CodemoatError):
    """A sealed file, license or lease was refused; the message says which check failed."""

    status = 403
    code = "license_error"


class LeaseDenied(VaultError):
    """The key server refused a lease; `code` is the reason clients act on (revoked ends serving)."""

    def __init__(self, code: str, message: str, status: int = 403):
        super().__init__(message)
        self.code, self.status = code, status


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: Any, what: str = "field") -> bytes:
    if not isinstance(text, str):
        raise VaultError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise VaultError(f"{what} is not valid base64") from None


def canonical(obj: Any) -> bytes:
    """The one byte string that is signed for a JSON object: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def key_id(public_raw: bytes) -> str:
    """Short printable id of a public key (first 16 hex digits of its SHA-256)."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def write_secret(path: Path, data: bytes) -> None:
    """Write a secret file with mode 0600 from the start (never readable by others, even briefly), never
    through a symbolic link or into a FIFO put in its place (one line instead)."""
    from ..paths import open_own

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_own(path, "file codemoat writes", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, VaultError)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def ed_private_raw(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def public_raw(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x_private_raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def ed_public(raw_b64: Any, what: str) -> Ed25519PublicKey:
    raw = b64d(raw_b64, what)
    if len(raw) != 32:
        raise VaultError(f"{what} is not a 32-byte Ed25519 public key")
    return Ed25519PublicKey.from_public_bytes(raw)


def x_public(raw_b64: Any, what: str) -> X25519PublicKey:
    raw = b64d(raw_b64, what)
    if len(raw) != 32:
        raise VaultError(f"{what} is not a 32-byte X25519 public key")
    return X25519PublicKey.from_public_bytes(raw)


def sign(key: Ed25519PrivateKey, domain: bytes, message: bytes) -> bytes:
    """Ed25519 over a domain-separation prefix, so a signature made for one purpose fits no other."""
    return key.sign(domain + b"\x00" + message)


def verify(pub: Ed25519PublicKey, signature: bytes, domain: bytes, message: bytes, what: str) -> None:
    try:
        pub.verify(signature, domain + b"\x00" + message)
    except InvalidSignature:
        raise VaultError(f"{what}: bad signature") from None


def _wrap_key(shared: bytes, epk: bytes, rpk: bytes, context: bytes) -> bytes:
    hk = HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + rpk, info=b"codemoat-wrap-v1\x00" + context)
    return hk.derive(shared)


def wrap(recipient: X25519PublicKey, secret: bytes, context: bytes) -> dict[str, str]:
    """Encrypt `secret` so that only the holder of `recipient`'s private key can read it."""
    eph = X25519PrivateKey.generate()
    epk = public_raw(eph.public_key())
    rpk = public_raw(recipient)
    k = _wrap_key(eph.exchange(recipient), epk, rpk, context)
    nonce = os.urandom(12)
    ct = AESGCM(k).encrypt(nonce, secret, context)
    return {"alg": WRAP_ALG, "epk": b64e(epk), "nonce": b64e(nonce), "ct": b64e(ct)}


def unwrap(private: X25519PrivateKey, wrapped: Any, context: bytes, what: str) -> bytes:
    """Inverse of `wrap`; a wrong key, a wrong context or an edited field all fail the same way."""
    if not isinstance(wrapped, dict) or wrapped.get("alg") != WRAP_ALG:
        raise VaultError(f"{what}: unknown key wrapping")
    epk = b64d(wrapped.get("epk"), f"{what} epk")
    nonce = b64d(wrapped.get("nonce"), f"{what} nonce")
    ct = b64d(wrapped.get("ct"), f"{what} ciphertext")
    if len(epk) != 32 or len(nonce) != 12:
        raise VaultError(f"{what}: malformed wrapped key")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(epk))
    except ValueError:
        raise VaultError(f"{what}: malformed wrapped key") from None
    k = _wrap_key(shared, epk, public_raw(private.public_key()), context)
    try:
        return AESGCM(k).decrypt(nonce, ct, context)
    except InvalidTag:
        raise VaultError(f"{what}: cannot be unwrapped with this machine's key") from None
