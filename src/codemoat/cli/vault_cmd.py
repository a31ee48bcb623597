"""Vault commands: vendor init/seal/unseal, licenses, machine-id, inspect, verify, keyserver."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import CodemoatError
from .apps import app, license_app, vendor_app
from .common import JsonFlag, VendorDir, console, emit, err_console, say, write_text


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@vendor_app.command("init")
def vendor_init(vendor: VendorDir, as_json: JsonFlag = False) -> None:
    """Make the vendor's signing keys, master key and database in DIR."""
    from ..vault.vendor import Vendor

    v = Vendor.init(vendor)
    info = json.loads((vendor / "vendor.json").read_text())
    v.close()
    emit(
        info,
        as_json,
        lambda d: console.print(
            f"vendor created in {vendor}: signing key {d['vendor_key_id']}, key server key {d['keyserver_key_id']}",
            soft_wrap=True,
        ),
    )


@app.command("machine-id")
def machine_id(
    as_json: JsonFlag = False,
    tpm: Annotated[
        bool | None,
        typer.Option(
            "--tpm/--no-tpm",
            help="Add this machine's TPM 2.0 keys (made in the chip) and its current PCR policy (default: the vault.tpm setting, auto).",
        ),
    ] = None,
    tcti: Annotated[
        str | None,
        typer.Option(
            help="How to reach the TPM (tpm2-tss TCTI), e.g. swtpm:host=127.0.0.1,port=2321 (default: device:<vault.tpm_device>).",
            envvar="CODEMOAT_TPM_TCTI",
        ),
    ] = None,
    pcrs: Annotated[
        str, typer.Option(help="PCRs the license policy covers (comma-separated; must include the tamper PCR 15).")
    ] = "15",
) -> None:
    """Print this machine's public identity (made on first use); send it to the vendor. It holds no secret."""
    from ..vault.machine import MachineKey

    key = MachineKey.load_or_create()
    from .tpm_cmd import enable_tpm, tpm_wanted

    use, tcti = tpm_wanted(tpm, tcti)
    if use:
        enable_tpm(key, tcti, pcrs)
    ident = key.identity()
    if as_json:
        emit(ident, True)
        return
    # The identity alone goes to stdout (`codemoat machine-id > machine.json` is what the vendor needs).
    err_console.print(
        f"[bold]{ident['id']}[/bold]  ({len(ident['facts'])} hardware facts, hashed; send the line below to your vendor)",
        highlight=False,
        soft_wrap=True,
    )
    typer.echo(json.dumps(ident, separators=(",", ":")))


def _fingerprinter():
    try:
        from ..trace.fingerprint import fingerprint_model
    except ModuleNotFoundError:
        raise CodemoatError(
            "weight fingerprinting is not available (codemoat.trace.fingerprint is missing); seal with --no-fingerprint"
        ) from None
    return fingerprint_model


@vendor_app.command("seal")
def vendor_seal(
    model: Annotated[Path, typer.Argument(help="A .gguf file, or a safetensors model (file or folder).")],
    vendor: VendorDir,
    customer: Annotated[str, typer.Option(help="Customer the copy is made for (created on first use).")],
    out: Annotated[Path, typer.Option(help="The sealed file to write (.moat).")],
    fingerprint: Annotated[
        bool, typer.Option("--fingerprint/--no-fingerprint", help="Embed the customer's weight fingerprint first.")
    ] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Encrypt a model for one customer: signed manifest, AES-256-GCM chunks, fresh content key."""
    from ..vault.vendor import Vendor

    _check_writable(out, force, "its licenses name that file's content; the new file gets a new key")
    fp = _fingerprinter() if fingerprint else None
    v = Vendor.open(vendor)
    try:
        sealed = v.seal(model, customer, out, fingerprint=fp)
    finally:
        v.close()
    d = sealed.describe()
    emit(
        d,
        as_json,
        lambda d: say(
            f"sealed {d['model_id']} ({d['format']}, {_size(d['plaintext_size'])}, {d['chunks']} chunks) for "
            f"{d['customer']} -> {out}  fingerprint: {'yes' if d['fingerprinted'] else 'no'}",
        ),
    )


@vendor_app.command("unseal")
def vendor_unseal(
    moat: Annotated[Path, typer.Argument(help="A sealed file made by this vendor.")],
    vendor: VendorDir,
    out: Annotated[Path, typer.Option(help="Where to write the plaintext model (a file, or a folder for safetensors).")],
    as_json: JsonFlag = False,
) -> None:
    """Decrypt the vendor's own sealed file (needs the vendor's keys and database)."""
    from ..vault.vendor import Vendor

    v = Vendor.open(vendor)
    try:
        path = v.unseal(moat, out)
    finally:
        v.close()
    emit(
        {"sealed": str(moat), "out": str(path)},
        as_json,
        lambda d: say(f"unsealed {moat.name} -> {path}"),
    )


@license_app.command("issue")
def license_issue(
    vendor: VendorDir,
    customer: Annotated[str, typer.Option(help="Customer the license is for.")],
    model: Annotated[Path, typer.Option(help="The customer's sealed model (.moat).")],
    machine: Annotated[
        list[str],
        typer.Option(
            help="Machine identity (a file or the JSON of `codemoat machine-id --json`); repeat for a floating lease license."
        ),
    ],
    expires: Annotated[str, typer.Option(help="Expiry: an ISO date (UTC) or a duration from now such as 365d.")],
    not_before: Annotated[str | None, typer.Option(help="Start: an ISO date (default: now).")] = None,
    support_until: Annotated[
        str | None,
        typer.Option(
            help="End of the support contract (an ISO date or a duration): update bundles released after it do not install. Default: none recorded (support runs to the expiry)."
        ),
    ] = None,
    features: Annotated[str, typer.Option(help="Comma-separated features: complete, chat, index.")] = "complete,chat,index",
    mode: Annotated[str, typer.Option(help="offline (signed certificate) or lease (key server heartbeat).")] = "offline",
    keyserver: Annotated[str | None, typer.Option(help="Key server URL for lease mode, e.g. http://127.0.0.1:8443.")] = None,
    lease_ttl: Annotated[str, typer.Option(help="Lease lifetime; renewed at half of it.")] = "1h",
    grace: Annotated[str, typer.Option(help="How long serving continues after a lease expires unrenewed.")] = "15m",
    seats: Annotated[int, typer.Option(help="Machines that may hold a lease at once (lease mode).")] = 1,
    max_seats_per_machine: Annotated[
        int | None,
        typer.Option(help="Seats one machine may hold at once (lease mode; each serving process holds one). Default: all."),
    ] = None,
    watermark: Annotated[
        bool, typer.Option("--watermark/--no-watermark", help="Deliver the customer's output-watermark key.")
    ] = True,
    match: Annotated[str, typer.Option(help="Hardware match policy: all, most, two, any.")] = "most",
    out: Annotated[Path | None, typer.Option(help="License file to write (default: <license id>.lic).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Sign a license binding a sealed model to a customer's machine(s), dates and features."""
    from ..vault.machine import parse_identity
    from ..vault.vendor import Vendor
    from ..durations import parse_duration, parse_when

    if mode not in ("offline", "lease"):
        raise CodemoatError("--mode must be offline or lease")
    machines = [parse_identity(m) for m in machine]
    expires_at = int(parse_when(expires))
    not_before_at = int(parse_when(not_before)) if not_before else None
    if out is not None:  # before signing: a license recorded but never written would be orphaned
        _check_writable(out, force, "the license in it stays in the vendor database: `vendor license show ID`")
    v = Vendor.open(vendor)
    try:
        doc = v.issue_license(
            customer=customer,
            model=model,
            machines=machines,
            expires=expires_at,
            not_before=not_before_at,
            features=[f.strip() for f in features.split(",") if f.strip()],
            mode=mode,
            keyserver=keyserver,
            lease_ttl=int(parse_duration(lease_ttl)),
            grace=int(parse_duration(grace)),
            seats=seats,
            max_seats_per_machine=max_seats_per_machine,
            watermark=watermark,
            policy=match,
            support_until=int(parse_when(support_until)) if support_until else None,
        )
    finally:
        v.close()
    body = doc["license"]
    path = out or Path(f"{body['id']}.lic")
    try:
        path.write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as e:
        raise CodemoatError(f"license {body['id']} was issued but cannot be written to {path}: {e.strerror}") from None
    from ..vault.license import License

    d = dict(License.parse(path.read_bytes()).describe(), file=str(path))
    emit(
        d,
        as_json,
        lambda d: say(
            f"license {d['id']} ({d['mode']}) for {d['customer']} on {', '.join(d['machines'])}, "
            f"expires {d['expires_iso']} -> {path}",
        ),
    )


def _check_writable(path: Path, force: bool = False, replacing: str = "") -> None:
    """One clear line now, rather than a failure after the work is done, when `path` cannot be written
    (or holds a file that only `--force` may replace)."""
    if path.is_dir():
        raise CodemoatError(f"{path} is a folder: name a file to write")
    if path.exists() and not force:
        raise CodemoatError(
            f"{path} exists: pass --force to replace it ({replacing})"
            if replacing
            else f"{path} exists: pass --force to replace it"
        )
    parent = path.parent
    if not parent.is_dir():
        raise CodemoatError(f"folder {parent} does not exist")


@license_app.command("revoke")
def license_revoke(
    license_id: Annotated[str, typer.Argument(help="License id (lic_...).")], vendor: VendorDir, as_json: JsonFlag = False
) -> None:
    """Revoke a license: its leases end at their next renewal."""
    from ..vault.vendor import Vendor

    v = Vendor.open(vendor)
    try:
        v.revoke(license_id)
    finally:
        v.close()
    emit({"revoked": license_id}, as_json, lambda d: say(f"revoked {license_id}"))


@license_app.command("show")
def license_show(
    license_id: Annotated[str, typer.Argument(help="License id (lic_...).")],
    vendor: VendorDir,
    out: Annotated[Path | None, typer.Option(help="Write the license file here (default: print it).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """A license exactly as it was issued, from the vendor database: print it, or write the .lic again."""
    from ..vault.license import License
    from ..vault.vendor import Vendor

    if out is not None:
        _check_writable(out, force)
    v = Vendor.open(vendor)
    try:
        row = v.license_row(license_id)
    finally:
        v.close()
    if row is None:
        raise CodemoatError(f"no license {license_id}")
    text = json.dumps(json.loads(row.document), indent=2) + "\n"
    if out is None:  # the document itself (JSON either way)
        sys.stdout.write(text)
        return
    write_text(out, text)
    d = dict(License.parse(text.encode()).describe(), file=str(out))
    emit(d, as_json, lambda d: say(f"license {d['id']} for {d['customer']} -> {out}"))


@license_app.command("list")
def license_list(vendor: VendorDir, as_json: JsonFlag = False) -> None:
    """Every license: customer, model, mode, dates, state and live leases."""
    from rich.table import Table

    from ..vault.clock import iso
    from ..vault.vendor import Vendor

    v = Vendor.open(vendor)
    try:
        rows = v.licenses()
    finally:
        v.close()

    def human(rows: list[dict[str, Any]]) -> None:
        t = Table("id", "customer", "model", "mode", "seats", "leases", "expires", "state")
        for r in rows:
            t.add_row(
                r["id"], r["customer"], r["model"], r["mode"], str(r["seats"]), str(r["leases"]), iso(r["expires"]), r["state"]
            )
        console.print(t)

    emit(rows, as_json, human)


@app.command("inspect")
def inspect_cmd(
    file: Annotated[Path, typer.Argument(help="A sealed model (.moat) or a license (.lic).")], as_json: JsonFlag = False
) -> None:
    """Show what a sealed model or license holds (after checking its signature); no secret is shown."""
    from ..vault.codec import VaultError
    from ..vault.container import MAGIC, SealedFile
    from ..vault.license import License

    try:
        head = file.read_bytes()[:8] if file.is_file() else b""
    except OSError as e:
        raise CodemoatError(f"cannot read {file}: {e.strerror}") from None
    if not file.is_file():
        raise CodemoatError(f"file not found: {file}")
    if head == MAGIC:
        d = SealedFile(file).describe()
    elif head.lstrip()[:1] == b"{":
        d = License.load(file).describe()
    else:
        raise VaultError(f"{file.name} is neither a sealed model nor a license")

    def human(d: dict[str, Any]) -> None:
        for k, v in d.items():
            if k in ("vendor_key",):
                continue
            say(f"[bold]{k}[/bold]: {v}")

    emit(d, as_json, human)


@app.command("verify")
def verify_cmd(
    model: Annotated[Path, typer.Option(help="The sealed model (.moat).")],
    license: Annotated[Path, typer.Option(help="Its license (.lic).")],
    as_json: JsonFlag = False,
) -> None:
    """Check signatures, machine binding, dates and model match, then decrypt every chunk in memory."""
    from ..config import load_settings
    from ..vault.verify import verify_bundle

    try:
        report = verify_bundle(model, license, tolerance=load_settings().vault.clock_tolerance_s)
    except CodemoatError as e:
        if as_json:
            emit({"ok": False, "error": str(e)}, True)
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None

    def human(r: dict[str, Any]) -> None:
        for c in r["checks"]:
            say(f"[green]ok[/green]  {c}")
        say(
            f"[bold green]valid[/bold green]: {r['model_id']} for {r['customer']}, license {r['license_id']} "
            f"({r['mode']}) until {r['expires']}",
        )

    emit(report, as_json, human)


@app.command("keyserver")
def keyserver_cmd(
    vendor: VendorDir,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8443,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Worker processes on one port (challenges live in the vendor database, so any worker accepts any other's).",
        ),
    ] = 1,
) -> None:
    """Run the lease service for this vendor's licenses."""
    import os

    import uvicorn

    from ..serve.keyserver_app import VENDOR_ENV, create_app
    from ..vault.vendor import Vendor

    v = Vendor.open(vendor)  # checks the folder and migrates the database once, before any worker starts
    say(
        f"key server on http://{host}:{port} (key {json.loads((vendor / 'vendor.json').read_text())['keyserver_key_id']}"
        f"{f', {workers} workers' if workers > 1 else ''})",
    )
    if workers == 1:
        uvicorn.run(create_app(v), host=host, port=port, log_level=log_level)
        return
    v.close()
    os.environ[VENDOR_ENV] = str(vendor.resolve())
    uvicorn.run(
        "codemoat.serve.keyserver_app:app_from_env", factory=True, workers=workers, host=host, port=port, log_level=log_level
    )
