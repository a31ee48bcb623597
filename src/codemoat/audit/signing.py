"""Signing audit checkpoints with the machine key (the vault's `MachineKey`, under `$CODEMOAT_HOME`).

The machine key holds an X25519 key (to receive wrapped content keys; it cannot sign) and an
Ed25519 key (RFC 8032) that proves the machine to a key server. Audit checkpoints and heads are
signed with that Ed25519 key under their own domain (`codemoat-audit-v1`, through `vault.codec`),
so an audit signature can never be mistaken for a lease request and the other way round. The key
file is created with mode 0600 by the vault and refused if others can read it. `key_id` (first 16
hex digits of SHA-256 of the public key) names the key in every signature.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ..errors import CodemoatError

DOMAIN = b"codemoat-audit-v1"


@dataclass(frozen=True)
class Signer:
    private: Any  # the machine's Ed25519 private key

    @property
    def public_bytes(self) -> bytes:
        from ..vault.codec import public_raw

        return public_raw(self.private.public_key())

    @property
    def key_id(self) -> str:
        return key_id(self.public_bytes)

    def sign(self, message: bytes) -> str:
        from ..vault.codec import sign

        return sign(self.private, DOMAIN, message).hex()

    def verify(self, message: bytes, signature_hex: str) -> bool:
        return verify(self.public_bytes, message, signature_hex)


def key_id(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:16]


def verify(public: bytes, message: bytes, signature_hex: str) -> bool:
    """True when `signature_hex` is the machine key's audit signature of `message`."""
    from ..vault.codec import VaultError, b64e, ed_public
    from ..vault.codec import verify as vault_verify

    try:
        vault_verify(ed_public(b64e(public), "audit key"), bytes.fromhex(signature_hex), DOMAIN, message, "audit signature")
        return True
    except (VaultError, ValueError):
        return False


def load_signer(*, create: bool = True) -> Signer:
    """This machine's key (created, mode 0600, on first use when `create`)."""
    from ..vault.machine import MachineKey

    try:
        key = MachineKey.load_or_create() if create else MachineKey.load()
    except CodemoatError as e:
        raise CodemoatError(f"audit signing key: {e}") from None
    return Signer(key.ed25519)
