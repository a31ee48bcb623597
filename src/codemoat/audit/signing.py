"""The audit-signing key: an Ed25519 key kept under `$CODEMOAT_HOME` with mode 0600.

The machine's identity key (vault) is X25519, which can agree keys but cannot sign, so the
audit log keeps its own Ed25519 key (RFC 8032) beside it. It is generated on first use on this
machine and never leaves it; `key_id` (first 16 hex digits of SHA-256 of the public key) names it
in every signature so that a checkpoint signed by another key is recognised as such.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .. import paths
from ..errors import CodemoatError

KEY_FILE = "audit-signing.key"


@dataclass(frozen=True)
class Signer:
    private: Ed25519PrivateKey

    @property
    def public_bytes(self) -> bytes:
        return self.private.public_key().public_bytes_raw()

    @property
    def key_id(self) -> str:
        return key_id(self.public_bytes)

    def sign(self, message: bytes) -> str:
        return self.private.sign(message).hex()

    def verify(self, message: bytes, signature_hex: str) -> bool:
        return verify(self.public_bytes, message, signature_hex)


def key_id(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:16]


def verify(public: bytes, message: bytes, signature_hex: str) -> bool:
    """True when `signature_hex` is a valid Ed25519 signature of `message` by `public`."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(bytes.fromhex(signature_hex), message)
        return True
    except (InvalidSignature, ValueError):
        return False


def key_path(home: Path | None = None) -> Path:
    return (home or paths.home()) / KEY_FILE


def load_signer(home: Path | None = None, *, create: bool = True) -> Signer:
    """This machine's audit-signing key, generated (mode 0600) on first use."""
    path = key_path(home)
    if not path.exists():
        if not create:
            raise CodemoatError(f"no audit-signing key at {path}: this machine has never written an audit record")
        seed = Ed25519PrivateKey.generate().private_bytes_raw()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            return load_signer(home, create=False)
        with os.fdopen(fd, "w") as f:
            f.write(seed.hex() + "\n")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CodemoatError(f"audit-signing key {path} is readable by others (mode {mode:o}): run chmod 600 {path}")
    try:
        seed = bytes.fromhex(path.read_text().strip())
        return Signer(Ed25519PrivateKey.from_private_bytes(seed))
    except ValueError as e:
        raise CodemoatError(f"audit-signing key {path} is damaged: {e}") from None
