"""The `Attestor` interface: what the vault needs from a hardware root, whatever the chip.

An attestor holds two keys whose private parts never leave the hardware: an unwrap key
(ECC P-256; `zgen` is the ECDH half of unwrapping, RFC 5903 / SP 800-56A "Z") whose use is
gated by a PCR policy, and an attestation key (`quote`) that signs the platform state with a
caller's nonce. Verifying what an attestor says needs no hardware and lives with the verifier
(`codemoat.vault.tpmwrap`), so a key server runs on any machine.

Usage:

    with attestor:                       # opens the connection to the chip
        ident = attestor.identity(policy)   # public keys, EK certificate, current PCR values
        z = attestor.zgen(policy, point)    # 32 bytes, or AttestError when the policy fails
        q = attestor.quote(policy, data)    # Quote: the signed statement and its signature
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import CodemoatError


class AttestError(CodemoatError):
    """The hardware refused or is unreachable; the message says which, in one line."""

    status = 403
    code = "attest_error"


@dataclass(frozen=True)
class Quote:
    """A signed platform statement: TPMS_ATTEST bytes as the chip marshalled them, and ECDSA (r, s);
    for a quote, `latch` is the same key's certification of the tamper latch over the same data."""

    attest: bytes
    r: bytes
    s: bytes
    latch: Quote | None = None


class Attestor(Protocol):
    """A hardware root. `policy` is {"pcrs": [int], "bank": "sha256", "digest": hex} as in a license."""

    kind: str

    def __enter__(self) -> Attestor: ...

    def __exit__(self, *exc: Any) -> None: ...

    def identity(self, pcrs: list[int]) -> dict[str, Any]: ...

    def zgen(self, policy: dict[str, Any], point: bytes) -> bytes: ...

    def quote(self, policy: dict[str, Any], data: bytes) -> Quote: ...

    def extend(self, pcr: int, data: bytes) -> None: ...
