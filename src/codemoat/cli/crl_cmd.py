"""`codemoat vendor revoke` (write a signed CRL) and `codemoat license crl install|show` (on the machine)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import CodemoatError
from .apps import crl_app, vendor_app
from .common import JsonFlag, VendorDir, check_writable, emit, say, write_text


@vendor_app.command("revoke")
def vendor_revoke(
    vendor: VendorDir,
    out: Annotated[Path, typer.Option(help="The CRL file to write (every revocation so far), e.g. revoked.crl.")],
    license: Annotated[list[str] | None, typer.Option("--license", help="License id to revoke; repeat for several.")] = None,
    machine: Annotated[
        list[str] | None, typer.Option("--machine", help="Machine id to revoke (all its licenses); repeat.")
    ] = None,
    reason: Annotated[str, typer.Option(help="Why, shown on the machine when it refuses to start.")] = "revoked by the vendor",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Revoke licenses or machines offline: record them and write the vendor's signed CRL (no subject: the current CRL)."""
    import json

    from ..vault import vendor_crl
    from ..vault.vendor import Vendor

    check_writable(out, force)
    with Vendor.open(vendor) as v:
        if license or machine:
            vendor_crl.revoke(v, licenses=license or [], machines=machine or [], reason=reason)
        doc = vendor_crl.build(v)
    write_text(out, json.dumps(doc, indent=2) + "\n")
    body = doc["crl"]
    d = {"number": body["number"], "revoked": len(body["revoked"]), "file": str(out)}
    emit(d, as_json, lambda d: say(f"CRL {d['number']} ({d['revoked']} revoked) -> {out}"))


@crl_app.command("install")
def crl_install(
    file: Annotated[Path, typer.Argument(help="The vendor's CRL file.")],
    as_json: JsonFlag = False,
) -> None:
    """Install the vendor's CRL: licenses and machines it names refuse to start. An older CRL cannot replace a newer one."""
    from ..vault import crl

    got, new = crl.install(crl.read_file(file))
    d = {"number": got.number, "revoked": len(got.body["revoked"]), "vendor_key_id": got.vendor_key_id, "installed": new}
    emit(d, as_json, lambda d: say(f"CRL {d['number']} ({d['revoked']} revoked) {'installed' if new else 'already installed'}"))


@crl_app.command("show")
def crl_show(as_json: JsonFlag = False) -> None:
    """The revocations installed on this machine, per vendor."""
    from .. import paths
    from ..vault import crl

    rows = []
    for p in sorted((paths.home() / "crl").glob("*.crl")):
        try:
            c = crl.Crl.parse(p.read_bytes())
        except (OSError, CodemoatError) as e:
            raise CodemoatError(f"the installed CRL {p} does not verify ({e})") from None
        rows += [dict(e, crl=c.number, vendor_key_id=c.vendor_key_id) for e in c.body["revoked"]]

    def human(rows: list) -> None:
        if not rows:
            say("no CRL installed")
        for r in rows:
            say(f"CRL {r['crl']}: {r['kind']} {r['id']}: {r['reason']}")

    emit(rows, as_json, human)
