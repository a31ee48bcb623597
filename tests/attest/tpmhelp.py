"""Provisioning a TPM machine the way the vendor must: trust the EK's CA, challenge, activate, confirm."""

from __future__ import annotations

from codemoat.attest.tpm import TAMPER_PCR
from codemoat.vault.machine import MachineKey, parse_identity
from codemoat.vault.tpmbind import EK_CA_FILE, activate, challenge, confirm, trust_ca


def trust_swtpm_ca(vendor, ca) -> None:
    """The vendor trusts the swtpm local CA (root and issuer) as it would a TPM manufacturer's."""
    if not (vendor.root / EK_CA_FILE).exists():
        trust_ca(vendor.root, (ca / "issuercert.pem").read_bytes() + (ca / "swtpm-localca-rootca-cert.pem").read_bytes())


def bind(vendor, key: MachineKey, ca) -> None:
    """TPM2_MakeCredential by the vendor, ActivateCredential in the machine's chip, the answer confirmed."""
    trust_swtpm_ca(vendor, ca)
    ch = challenge(vendor, parse_identity(key.identity()))
    confirm(vendor, activate(key.attestor(), key.id, key.tpm["identity"], ch))


def tpm_machine(tpm, vendor=None, pcrs=(TAMPER_PCR,)) -> MachineKey:
    """This home's machine key with `tpm` (a Swtpm) set up; bound at `vendor` when one is given."""
    MachineKey.load_or_create().enable_tpm(tpm.tcti, list(pcrs))
    key = MachineKey.load()
    if vendor is not None:
        bind(vendor, key, tpm.ca)
    return key
