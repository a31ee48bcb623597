"""Vault commands: vendor init/seal/unseal, machine-id, inspect, verify, keyserver (licenses: `license_cmd`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import CodemoatError
from .apps import app, vendor_app
from .common import JsonFlag, VendorDir, check_writable, console, emit, err_console, say


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
        f"[bold]{ident['id']}[/bold]  ({len(ident['facts'])} hardware facts, hashed; send the line below to your vendor)"
        + (
            "\n[yellow]no hardware facts found on this machine[/yellow]: a license for it binds only its key file, so the"
            " vendor must pass --allow-no-hardware-facts (or run `codemoat machine-id --tpm` here to bind it to the TPM)"
            if not ident["facts"] and not ident.get("tpm")
            else ""
        ),
        highlight=False,
        soft_wrap=True,
    )
    typer.echo(json.dumps(ident, separators=(",", ":")))


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
    from ..trace.fingerprint import fingerprint_model
    from ..vault.samefile import refuse_input_as_output
    from ..vault.seal_model import check_gguf, model_inputs
    from ..vault.vendor import Vendor

    refuse_input_as_output(out, model_inputs(model), "model")  # first: --force would only be refused next
    check_writable(out, force, "its licenses name that file's content; the new file gets a new key")
    if model.suffix == ".gguf" and model.is_file():  # whole, before sealing (the magic alone let garbage through)
        check_gguf(model)
    fp = fingerprint_model if fingerprint else None
    with Vendor.open(vendor) as v:
        sealed = v.seal(model, customer, out, fingerprint=fp)
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
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing --out file, or write into a folder that is not empty.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Decrypt the vendor's own sealed file (needs the vendor's keys and database)."""
    from ..vault.samefile import refuse_input_as_output
    from ..vault.vendor import Vendor

    refuse_input_as_output(out, [moat], "sealed file")  # before the vendor opens (Vendor.unseal says it too)
    with Vendor.open(vendor) as v:
        path = v.unseal(moat, out, force=force)
    emit(
        {"sealed": str(moat), "out": str(path)},
        as_json,
        lambda d: say(f"unsealed {moat.name} -> {path}"),
    )


@app.command("inspect")
def inspect_cmd(
    file: Annotated[Path, typer.Argument(help="A sealed model (.moat) or a license (.lic).")], as_json: JsonFlag = False
) -> None:
    """Show what a sealed model or license holds (after checking its signature); no secret is shown."""
    from ..vault.codec import VaultError
    from ..vault.container import MAGIC, SealedFile
    from ..vault.license import License

    from ..paths import open_regular

    fd, _ = open_regular(file, "sealed model or license")  # a FIFO or device is refused, not waited on
    try:
        head = os.pread(fd, 8, 0)
    finally:
        os.close(fd)
    if head == MAGIC:
        d = SealedFile(file).describe()
    elif head.lstrip()[:1] == b"{":
        d = License.load(file).describe()
    else:
        raise VaultError(f"{file.name} is neither a sealed model nor a license")

    def human(d: dict[str, Any]) -> None:
        from rich.markup import escape

        from ..vault.clock import iso

        def shown(k: str, v: Any) -> str:  # dates as dates (`--json` keeps Unix times), nested fields as key: value
            if k in ("issued_at", "not_before", "expires", "created") and isinstance(v, int | float):
                return iso(v)
            if isinstance(v, dict):
                return ", ".join(f"{kk}: {shown(kk, vv)}" for kk, vv in v.items())
            return str(v)

        for k, v in d.items():
            if k == "vendor_key" or (k.endswith("_iso") and k[:-4] in d):  # the date itself is shown as one
                continue
            say(f"[bold]{k}[/bold]: {escape(shown(k, v))}")

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

    report = verify_bundle(model, license, tolerance=load_settings().vault.clock_tolerance_s)  # refusals: main's one line

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
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0 picks a free one).")] = 8443,
    log_level: Annotated[
        str, typer.Option(help="uvicorn log level: critical, error, warning, info, debug or trace.")
    ] = "warning",
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Worker processes on one port (challenges live in the vendor database, so any worker accepts any other's).",
        ),
    ] = 1,
    read_timeout: Annotated[
        float,
        typer.Option(
            min=0.1,
            help="Seconds a client has to send a request once connected, plus one a KiB received; later: 408, connection closed.",
        ),
    ] = 30.0,
) -> None:
    """Run the lease service for this vendor's licenses."""
    import uvicorn

    from ..config.serving import LOG_LEVELS, bind_host, http_url

    log_level = log_level.strip().lower()
    if log_level not in LOG_LEVELS:  # before anything starts: it said "key server on ..." and then died (KeyError)
        raise CodemoatError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}")

    try:
        bind_host(host)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--host") from None
    if workers > 1 and port == 0:  # each worker binds the port itself: "any free port" would be one per worker
        raise typer.BadParameter("--workers above 1 needs a fixed --port", param_hint="--port")

    from ..serve.keyserver_app import create_app, serve_workers
    from ..serve.readguard import guarded, raise_open_files
    from ..vault.vendor import Vendor

    v = Vendor.open(vendor)  # checks the folder and migrates the database once, before any worker starts
    sock = None
    if workers == 1:  # listening before saying so: an address not ours or a port taken is one line, and 0 is named
        from ..serve.run import listen

        sock = listen(host, port)
        port = sock.getsockname()[1]
    say(
        f"key server on {http_url(host, port)} (key {json.loads((vendor / 'vendor.json').read_text())['keyserver_key_id']}"
        f"{f', {workers} workers' if workers > 1 else ''})",
        markup=False,  # an IPv6 address in brackets is no rich markup tag: "[fe80::1]" vanished
    )
    # Per request, uvicorn formats an access line (then dropped below "info") and reads X-Forwarded-* headers the
    # key server never uses (it answers by signature, not by address): a few µs of a lease's CPU. The access line
    # is made only at --log-level info or below; proxy headers are not read.
    opts = {"log_level": log_level, "proxy_headers": False, "access_log": log_level.lower() in ("info", "debug", "trace")}
    if workers == 1:
        raise_open_files()  # with the request deadline: silent connections cannot take every descriptor
        config = uvicorn.Config(create_app(v), host=host, port=port, http=guarded(read_timeout_s=read_timeout), **opts)
        uvicorn.Server(config).run(sockets=[sock])
        return
    v.close()
    serve_workers(str(vendor.resolve()), workers, host, port, read_timeout_s=read_timeout, **opts)
