"""Small payloads sealed to a customer's machines: update bundles' adapters and knowledge packs.

    blob = nonce (12) | AES-256-GCM(content key, plaintext, associated data = context)

The content key is fresh per payload and wrapped (codec.wrap: X25519 + HKDF + AES-GCM) to each
machine the customer's license names, under the same context, so a blob opens only on those
machines and only as the bundle it was made for (the context names the bundle, its kind, name,
version and customer). Models are not sealed here: they go through `Vendor.seal` (fingerprinted,
chunked .moat) and a license.
"""

from __future__ import annotations

import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .codec import VaultError, unwrap, wrap, x_public
from .machine import MachineKey

MAX_PAYLOAD = 1 << 30  # one AES-GCM call holds the whole plaintext in memory


def seal_payload(plaintext: bytes, machines: list[dict[str, Any]], context: bytes) -> tuple[bytes, dict[str, Any]]:
    """(blob, {machine id: wrapped key}) for `plaintext`, readable only on `machines`."""
    if len(plaintext) > MAX_PAYLOAD:
        raise VaultError(f"payload of {len(plaintext)} bytes is over the {MAX_PAYLOAD} byte limit of a sealed payload")
    key, nonce = AESGCM.generate_key(256), os.urandom(12)
    blob = nonce + AESGCM(key).encrypt(nonce, plaintext, context)
    keys = {m["id"]: wrap(x_public(m["x25519"], "machine x25519 key"), key, context) for m in machines}
    return blob, keys


def open_payload(blob: bytes, keys: Any, machine: MachineKey, context: bytes) -> bytes:
    """The plaintext of `blob`; refuses another machine, another context or any changed byte."""
    if not isinstance(keys, dict) or machine.id not in keys:
        raise VaultError(f"this payload is not sealed for this machine ({machine.id})")
    key = unwrap(machine.x25519, keys[machine.id], context, "payload key")
    if len(blob) < 12 + 16:
        raise VaultError("sealed payload is truncated")
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], context)
    except InvalidTag:
        raise VaultError("sealed payload does not decrypt (changed, truncated or made for another bundle)") from None
