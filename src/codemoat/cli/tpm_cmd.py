"""TPM commands: `appliance tamper-event` (the chassis sensor's handler) and `vendor license reprovision`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import CodemoatError
from .apps import appliance_app, license_app
from .common import JsonFlag, console, emit

TAMPER_DOMAIN = b"codemoat-tamper-v1\x00"


def _pcr_list(text: str) -> list[int]:
    try:
        pcrs = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise CodemoatError(f"--pcrs must be comma-separated PCR numbers, not {text!r}") from None
    if not pcrs or not all(0 <= p < 24 for p in pcrs):
        raise CodemoatError("--pcrs must name PCRs between 0 and 23")
    return pcrs


def tpm_wanted(flag: bool | None, tcti: str | None) -> tuple[bool, str]:
    """Whether `machine-id` uses a TPM, and how to reach it: the flag, else the vault.tpm setting
    (auto: when the device exists and tpm2-pytss is installed)."""
    import importlib.util
    import os

    from ..config import load_settings

    v = load_settings(None).vault
    tcti = tcti or f"device:{v.tpm_device}"
    if flag is not None:
        return flag, tcti
    if v.tpm == "auto":
        return os.path.exists(v.tpm_device) and importlib.util.find_spec("tpm2_pytss") is not None, tcti
    return v.tpm == "on", tcti


def enable_tpm(key: Any, tcti: str, pcrs: str) -> dict[str, Any]:
    """Record this machine's TPM (keys re-derived in the chip, the current PCR policy) in tpm.json."""
    from ..attest.tpm import TAMPER_PCR

    chosen = _pcr_list(pcrs)
    if TAMPER_PCR not in chosen:
        raise CodemoatError(f"--pcrs must include the tamper PCR {TAMPER_PCR}, or a tamper event would not lock the model")
    return key.enable_tpm(tcti, chosen)


def _audit(reason: str, pcr: int) -> int | None:
    """One `tamper` record in this server's audit log (None when this machine has no database yet)."""
    from .. import paths
    from ..audit.log import AuditLog, head_file_for, verified_file_for
    from ..config import load_settings
    from ..db import open_db

    s = load_settings(None)
    url = s.database_url or paths.db_url()
    home = paths.home()
    log = AuditLog(
        open_db(url),
        checkpoint_every=s.audit.checkpoint_every,
        head_file=head_file_for(url, home),
        verified_file=verified_file_for(url, home),
    )
    return log.append("tamper", user="appliance", route="appliance tamper-event", detail={"reason": reason, "pcr": pcr})


@appliance_app.command("tamper-event")
def tamper_event(
    reason: Annotated[str, typer.Option(help="What happened (e.g. 'chassis opened'); recorded in the audit log.")],
    as_json: JsonFlag = False,
) -> None:
    """Lock the model: extend the TPM's tamper PCR so neither the offline unwrap nor a lease works until the vendor reprovisions."""
    from ..attest.tpm import TAMPER_PCR
    from ..vault.machine import MachineKey

    if not reason.strip() or len(reason) > 500:
        raise CodemoatError("--reason must be 1 to 500 characters")
    key = MachineKey.load()
    with key.attestor() as a:
        a.extend(TAMPER_PCR, TAMPER_DOMAIN + reason.encode())
        value = a.pcr_values([TAMPER_PCR])[0].hex()
    seq = _audit(reason, TAMPER_PCR)
    emit(
        {"pcr": TAMPER_PCR, "value": value, "reason": reason, "audit_seq": seq},
        as_json,
        lambda d: console.print(
            f"tamper event recorded: PCR {TAMPER_PCR} extended; the model is locked until the vendor "
            "reprovisions (send `codemoat machine-id --tpm` to the vendor)",
            highlight=False,
            soft_wrap=True,
        ),
    )


@license_app.command("reprovision")
def license_reprovision(
    license_id: Annotated[str, typer.Argument(help="License id (lic_...).")],
    vendor: Annotated[
        Path, typer.Option("--vendor", help="The vendor's directory (keys and database).", envvar="CODEMOAT_VENDOR")
    ],
    machine: Annotated[
        str, typer.Option(help="The machine's new identity (`codemoat machine-id --tpm --json`, a file or JSON).")
    ],
    out: Annotated[Path | None, typer.Option(help="License file to write (default: <license id>.lic).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Re-sign a TPM-bound license with the same chip's new PCR policy (after a tamper event was dealt with)."""
    from ..vault.machine import parse_identity
    from ..vault.reprovision import reprovision
    from ..vault.vendor import Vendor

    ident = parse_identity(machine)
    path = out or Path(f"{license_id}.lic")
    if path.exists() and not force:
        raise CodemoatError(f"{path} exists: pass --force to replace it")
    v = Vendor.open(vendor)
    try:
        doc = reprovision(v, license_id, ident)
    finally:
        v.close()
    try:
        path.write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as e:
        raise CodemoatError(f"license {license_id} was reprovisioned but cannot be written to {path}: {e.strerror}") from None
    pol = ident["tpm"]["policy"]
    emit(
        {"license_id": license_id, "machine_id": ident["id"], "policy": pol, "file": str(path)},
        as_json,
        lambda d: console.print(
            f"license {license_id} reprovisioned for {ident['id']} (PCRs {pol['pcrs']}, digest {pol['digest'][:12]}…) -> {path}",
            highlight=False,
            soft_wrap=True,
        ),
    )
