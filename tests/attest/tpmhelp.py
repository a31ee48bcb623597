"""Provisioning a TPM machine the way the vendor must: trust the EK's CA, challenge, activate, confirm;
and the audit log the TPM checkpoint tests write to."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import httpx

from codemoat import paths
from codemoat.attest.tpm import TAMPER_PCR
from codemoat.audit.log import AuditLog, head_file_for, verified_file_for
from codemoat.db import open_db
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


def audit_log(url: str, **kw) -> AuditLog:
    """The audit log at database `url`, a TPM checkpoint every 4 records, its head files in this home."""
    home = paths.home()
    return AuditLog(
        open_db(url), checkpoint_every=4, head_file=head_file_for(url, home), verified_file=verified_file_for(url, home), **kw
    )


def append(log: AuditLog, n: int) -> None:
    """`n` request records by alice."""
    for i in range(n):
        log.append("request", user="alice", route="/v1/completions", status=200, prompt_tokens=i)


@contextlib.contextmanager
def keyserver_process(vendor_dir, *extra: str):
    """A real `codemoat keyserver` subprocess on a free loopback port: yields its URL; stopped after."""
    from conftest import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "codemoat.cli.main", "keyserver", "--vendor", str(vendor_dir), "--port", str(port), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"key server exited: {proc.stderr.read().decode()[-400:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.time() > deadline:
                    raise RuntimeError("key server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
