"""`codemoat vendor license issue|revoke|show|list`: the vendor's licenses, kept in its database."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import CodemoatError
from .apps import license_app
from .common import JsonFlag, VendorDir, check_writable, console, emit, id_column, say, table, write_text


def _check_keyserver_url(url: str) -> None:
    """Before signing: a lease license naming a URL no HTTP client can reach ("ftp://x", "not a url") was signed
    and recorded, and failed only on the customer's machine ("key server unreachable ...: UnsupportedProtocol")."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(url)
        ok = u.scheme in ("http", "https") and bool(u.hostname) and (u.port is None or u.port > 0)
    except ValueError:  # a port that is not a number, or past 65535
        ok = False
    if not ok:
        raise CodemoatError(f"--keyserver {url!r} must be http(s)://HOST[:PORT], as the customer's machines reach the key server")


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
    allow_no_hardware_facts: Annotated[
        bool,
        typer.Option(
            "--allow-no-hardware-facts",
            help="License a machine whose identity holds no hardware facts (some machines have none to give: an arm64 CPU, a container without a machine-id): the license then binds only its key file, which copies anywhere. Refused without this flag.",
        ),
    ] = False,
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
    if mode == "lease" and keyserver is not None:
        _check_keyserver_url(keyserver)
    machines = [parse_identity(m) for m in machine]
    expires_at = int(parse_when(expires))
    not_before_at = int(parse_when(not_before)) if not_before else None
    if out is not None:  # before signing: a license recorded but never written would be orphaned
        from ..vault.samefile import refuse_input_as_output

        refuse_input_as_output(out, [model], "sealed model")  # --force replaced the customer's model by its license
        check_writable(out, force, "the license in it stays in the vendor database: `vendor license show ID`")
    with Vendor.open(vendor) as v:
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
            allow_no_facts=allow_no_hardware_facts,
            support_until=int(parse_when(support_until)) if support_until else None,
        )
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


@license_app.command("revoke")
def license_revoke(
    license_id: Annotated[str, typer.Argument(help="License id (lic_...).")], vendor: VendorDir, as_json: JsonFlag = False
) -> None:
    """Revoke a license: its leases end at their next renewal."""
    from ..vault.vendor import Vendor

    with Vendor.open(vendor) as v:
        v.revoke(license_id)
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
        check_writable(out, force)
    with Vendor.open(vendor) as v:
        row = v.license_row(license_id)
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
    from ..vault.clock import iso
    from ..vault.vendor import Vendor

    with Vendor.open(vendor) as v:
        rows = v.licenses()

    def human(rows: list[dict[str, Any]]) -> None:
        t = table(id_column(rows), "customer", "model", "mode", "seats", "leases", "expires", "state")
        for r in rows:
            t.add_row(
                r["id"], r["customer"], r["model"], r["mode"], str(r["seats"]), str(r["leases"]), iso(r["expires"]), r["state"]
            )
        console.print(t)

    emit(rows, as_json, human)
