"""Leases for AMD SEV-SNP guests: the key server releases keys to a confidential VM only when its
attestation report holds (`attest.sevsnp.verify_report`), the second hardware root beside the TPM.

A license's machine entry may carry `"snp": {"measurement": HEX}`: the guest's launch measurement
(48 bytes) the vendor recorded at provisioning, signed into the license. Each lease request from that
machine then carries `"snp": {"report": HEX, "vcek": BASE64 DER, "ask": PEM}`: an SNP attestation
report whose `report_data` is `keyserver.quote_data(request)` (SHA-256 over the signed request, so
the report is as fresh as the key server's nonce), the VCEK certificate of that chip and TCB, and
AMD's ASK. The key server checks it against the ARK the vendor pinned (`SNP_ARK_FILE` in the vendor
folder; AMD's root for the product line, never one sent by the client), the report's signature, the
VCEK's chip and TCB, a guest policy without debugging, the nonce and the measurement, and only then
wraps the keys (to the machine's X25519 key: inside the guest, memory encryption protects it).

The guest side (asking the AMD secure processor for a report, `/dev/sev-guest` or configfs-tsm) is
not built here: no SNP guest was available to test it against.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from .codec import VaultError

SNP_ARK_FILE = "snp-ark.pem"
MEASUREMENT_LEN = 48


class SnpLeaseRefused(VaultError):
    """An SNP report in a lease request that does not hold (the message names the check)."""

    code = "snp_refused"


def check_snp_block(x: Any) -> dict[str, Any]:
    """A license's `snp` block: {"measurement": 96 hex digits}; VaultError when malformed."""
    m = x.get("measurement") if isinstance(x, dict) else None
    try:
        ok = isinstance(m, str) and len(bytes.fromhex(m)) == MEASUREMENT_LEN
    except ValueError:
        ok = False
    if not ok or set(x) != {"measurement"}:
        raise VaultError(f"license machine 'snp' block must be {{'measurement': {MEASUREMENT_LEN * 2} hex digits}}")
    return {"measurement": m.lower()}


def trust_ark(root: Path, pem: bytes) -> None:
    """Pin AMD's root (ARK) for this vendor's key server (one product line: Milan, Genoa, ...)."""
    from cryptography import x509

    try:
        x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise VaultError("the AMD ARK is not a PEM certificate") from None
    (root / SNP_ARK_FILE).write_bytes(pem)


def verify_snp(root: Path, snp: dict[str, Any], sent: Any, data: bytes) -> None:
    """The request's SNP report (`sent`) over `data`, for the license entry's `snp` block; else SnpLeaseRefused."""
    from ..attest.sevsnp import SnpRefused, verify_report

    if not isinstance(sent, dict) or not all(isinstance(sent.get(k), str) for k in ("report", "vcek", "ask")):
        raise SnpLeaseRefused("request carries no SEV-SNP attestation report (this license is bound to an SNP guest)")
    try:
        ark = (root / SNP_ARK_FILE).read_bytes()
    except FileNotFoundError:
        raise SnpLeaseRefused(f"this key server pins no AMD root ({SNP_ARK_FILE} in the vendor folder)") from None
    try:
        raw = bytes.fromhex(sent["report"])
        vcek = base64.b64decode(sent["vcek"], validate=True)
    except (ValueError, binascii.Error):
        raise SnpLeaseRefused("the SNP report or VCEK certificate is not hex / base64") from None
    try:
        verify_report(raw, vcek, sent["ask"].encode(), ark, ark, report_data=data, measurement=bytes.fromhex(snp["measurement"]))
    except SnpRefused as e:
        raise SnpLeaseRefused(str(e)) from None
