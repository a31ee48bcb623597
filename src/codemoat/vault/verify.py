"""`codemoat verify`: every check a sealed model and its license must pass on this machine, in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .clock import Clock, ClockGuard, iso
from .container import SealedFile
from .license import License, check
from .machine import MachineKey


def verify_bundle(
    model: str | Path,
    license_path: str | Path,
    *,
    tolerance: float = 300,
    machine: MachineKey | None = None,
    clock: Clock | None = None,
) -> dict[str, Any]:
    """A report of the checks passed; raises `VaultError` at the first one that fails.

    The plaintext is decrypted a chunk at a time into a scratch buffer, hashed against the signed
    manifest and zeroed; it is never written anywhere."""
    checks: list[str] = []
    machine = machine or MachineKey.load()
    sealed = SealedFile(model)
    checks.append(f"sealed file header and manifest signature (vendor {sealed.vendor_key_id})")
    lic = License.load(license_path)
    checks.append(f"license signature (vendor {lic.vendor_key_id})")
    grant = check(lic, sealed, machine, ClockGuard(machine, clock, tolerance))
    checks.append(f"vendor, model, customer, machine {machine.id}, hardware facts (policy {lic.match_policy}), clock, dates")
    key = grant.content_key
    if lic.mode == "lease":
        from .lease import LeaseClient

        client = LeaseClient(lic, machine, clock=clock)
        try:
            lease = client.bounded(client.acquire)
            client.bounded(client.release)
        finally:
            client.close()
        key = lease.content_key
        checks.append(f"lease from {lic.lease['url']} ({lease.seats_used}/{lease.seats} seats)")
    assert key is not None
    # chunk by chunk into a scratch buffer that decrypt_to zeroes: memory is one chunk, whatever the size
    sealed.decrypt_to(key, lambda offset, plaintext: None, check_sha256=True)
    checks.append(f"all {sealed.n_chunks} chunks authenticated, plaintext SHA-256 matches")
    return {
        "ok": True,
        "checks": checks,
        "license_id": lic.id,
        "customer": lic.customer,
        "mode": lic.mode,
        "model_id": sealed.manifest.model_id,
        "format": sealed.manifest.format,
        "features": lic.features,
        "expires": iso(lic.expires),
        "machine_id": machine.id,
    }
