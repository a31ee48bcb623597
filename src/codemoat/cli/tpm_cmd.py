"""TPM commands: `appliance tamper-event` (the chassis sensor's handler), `vendor license reprovision`, and
binding a machine's attestation key to its certified EK: `vendor tpm trust-ca|challenge|confirm` with
`appliance tpm-activate` on the machine (TPM2_MakeCredential / ActivateCredential, `vault.tpmbind`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import CodemoatError
from .apps import appliance_app, audit_app, license_app, vendor_tpm_app
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
    seq = log.append("tamper", user="appliance", route="appliance tamper-event", detail={"reason": reason, "pcr": pcr})
    from ..audit.tpm_checkpoint import take

    try:
        take(log)  # the chip certifies its audit counter over the log, tamper record included
    except CodemoatError as e:  # the tamper event itself stands; the next checkpoint covers it
        console.print(f"warning: no TPM checkpoint of the audit log: {e}", style="yellow", highlight=False, soft_wrap=True)
    return seq


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
        latch = a.tamper(TAMPER_PCR, TAMPER_DOMAIN + reason.encode())  # the PCR now, the NV latch past reboots
        value = a.pcr_values([TAMPER_PCR])[0].hex()
    seq = _audit(reason, TAMPER_PCR)
    emit(
        {"pcr": TAMPER_PCR, "value": value, "latch": latch, "reason": reason, "audit_seq": seq},
        as_json,
        lambda d: console.print(
            f"tamper event recorded: PCR {TAMPER_PCR} extended, tamper latch at {d['latch']} (a reboot does not "
            "reset it); the model is locked until the vendor "
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


VendorOpt = Annotated[
    Path, typer.Option("--vendor", help="The vendor's directory (keys and database).", envvar="CODEMOAT_VENDOR")
]


def _write(path: Path, doc: dict[str, Any], force: bool) -> None:
    if path.exists() and not force:
        raise CodemoatError(f"{path} exists: pass --force to replace it")
    try:
        path.write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as e:
        raise CodemoatError(f"cannot write {path}: {e.strerror}") from None


@vendor_tpm_app.command("trust-ca")
def tpm_trust_ca(
    ca: Annotated[Path, typer.Argument(help="PEM file: a TPM manufacturer's root (and intermediate) CA certificates.")],
    vendor: VendorOpt,
    as_json: JsonFlag = False,
) -> None:
    """Trust a TPM manufacturer's CA: EK certificates must chain to one before a machine's TPM is bound."""
    from ..vault.tpmbind import EK_CA_FILE, trust_ca
    from ..vault.vendor import Vendor

    from ..paths import read_regular

    pem = read_regular(ca, "CA certificate file", 16 << 20)
    v = Vendor.open(vendor)
    try:
        n = trust_ca(v.root, pem)
    finally:
        v.close()
    emit(
        {"added": n, "file": str(vendor / EK_CA_FILE)},
        as_json,
        lambda d: console.print(f"{n} certificate(s) added to {d['file']}", highlight=False, soft_wrap=True),
    )


@vendor_tpm_app.command("challenge")
def tpm_challenge(
    vendor: VendorOpt,
    machine: Annotated[str, typer.Option(help="The machine's identity (`codemoat machine-id --tpm --json`, a file or JSON).")],
    out: Annotated[Path, typer.Option(help="Challenge file to send to the machine.")] = Path("tpm-challenge.json"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Check the machine's EK certificate chain and AK, and write a credential only that TPM can activate."""
    from ..vault.machine import parse_identity
    from ..vault.tpmbind import challenge
    from ..vault.vendor import Vendor

    ident = parse_identity(machine)
    v = Vendor.open(vendor)
    try:
        doc = challenge(v, ident)
    finally:
        v.close()
    _write(out, doc, force)
    emit(
        {"machine_id": ident["id"], "ak_id": doc["ak_id"], "file": str(out)},
        as_json,
        lambda d: console.print(
            f"EK certificate of {ident['id']} chains to a trusted TPM CA; challenge -> {out} "
            "(on the machine: `codemoat appliance tpm-activate`)",
            highlight=False,
            soft_wrap=True,
        ),
    )


@vendor_tpm_app.command("confirm")
def tpm_confirm(
    activation: Annotated[str, typer.Argument(help="The machine's answer (`codemoat appliance tpm-activate`), a file or JSON.")],
    vendor: VendorOpt,
    as_json: JsonFlag = False,
) -> None:
    """Bind the machine's attestation key once its TPM gave back the challenge's secret; licenses may then name it."""
    from ..vault.tpmbind import confirm
    from ..vault.vendor import Vendor

    v = Vendor.open(vendor)
    try:
        got = confirm(v, activation)
    finally:
        v.close()
    emit(
        got,
        as_json,
        lambda d: console.print(
            f"TPM attestation key of {d['machine_id']} bound to its certified EK", highlight=False, soft_wrap=True
        ),
    )


@appliance_app.command("tpm-activate")
def tpm_activate(
    challenge_file: Annotated[
        str, typer.Argument(help="The vendor's challenge (`codemoat vendor tpm challenge`), a file or JSON.")
    ],
    out: Annotated[Path, typer.Option(help="Answer file to send back to the vendor.")] = Path("tpm-activation.json"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Let this machine's TPM open the vendor's credential (only the chip with that EK and this AK can)."""
    from ..vault.machine import MachineKey
    from ..vault.tpmbind import activate

    key = MachineKey.load()
    if not key.tpm:
        raise CodemoatError("this machine has no TPM set up: run `codemoat machine-id --tpm` first")
    doc = activate(key.attestor(), key.id, key.tpm["identity"], challenge_file)
    _write(out, doc, force)
    emit(
        {"machine_id": key.id, "file": str(out)},
        as_json,
        lambda d: console.print(
            f"TPM activated the vendor's credential -> {out} (send it to the vendor)", highlight=False, soft_wrap=True
        ),
    )


@audit_app.command("tpm-checkpoint")
def audit_tpm_checkpoint(
    config: Annotated[Path | None, typer.Option(help="TOML configuration file.", envvar="CODEMOAT_CONFIG")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Have the TPM sign a checkpoint of the audit log with its monotonic counter (run it from a timer).

    `audit verify` then catches the log put back to an older copy."""
    from ..audit.tpm_checkpoint import take
    from .audit_cmd import _log

    got = take(_log(config))
    if got is None:
        emit({"record": None}, as_json, lambda d: console.print("the audit log is empty: nothing to checkpoint"))
        return
    out = {k: got[k] for k in ("record", "seq", "counter", "ak_id")}
    emit(
        out,
        as_json,
        lambda d: console.print(
            f"TPM checkpoint: counter {d['counter']} over record {d['seq']} (written as record {d['record']})",
            highlight=False,
            soft_wrap=True,
        ),
    )
