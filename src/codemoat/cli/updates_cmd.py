"""`codemoat vendor release` and `codemoat update verify|apply|list|rollback`: signed offline updates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import CodemoatError
from .apps import update_app, vendor_app
from .common import (
    JsonFlag,
    VendorDir,
    check_writable,
    console,
    emit,
    emit_failed,
    open_audit_log,
    print_error,
    say,
    table,
)

LicenseOpt = Annotated[
    Path | None,
    typer.Option(
        "--license",
        help="Your current license (.lic): its support window gates the bundle; recorded once the bundle installs. Default: the one recorded by the last apply.",
    ),
]

SwapOpt = Annotated[
    bool,
    typer.Option(
        "--swap/--no-swap",
        help="Hand a model, or an adapter a server serves, to the `codemoat serve` running on this home, which "
        "swaps it in without a restart (a failed health check keeps the old one and rolls the store back).",
    ),
]


@vendor_app.command("release")
def vendor_release(
    vendor: VendorDir,
    customer: Annotated[str, typer.Option(help="Customer the bundle is for (bound to the machines of its latest license).")],
    version: Annotated[str, typer.Option(help="The bundle's version, e.g. 2 or 1.4.0 (compared numerically).")],
    out: Annotated[Path, typer.Option(help="The bundle to write (.moatpkg).")],
    model: Annotated[
        Path | None,
        typer.Option(help="A model (.gguf, or safetensors file or folder): sealed and fingerprinted for the customer."),
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option(help="An adapter file, fingerprinted (GGUF) and sealed to the customer's machines.")
    ] = None,
    knowledge_pack: Annotated[
        Path | None, typer.Option(help="A folder (or .zip) of documentation and source for the customer's retrieval index.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name of the adapter or pack (default: the file or folder name).")] = None,
    notes: Annotated[str, typer.Option(help="Release notes shown by `update list`.")] = "",
    replaces: Annotated[
        str | None, typer.Option(help="The version this one follows (default: the last one released to this customer).")
    ] = None,
    rollback_target: Annotated[
        bool,
        typer.Option("--rollback-target", help="Sign this bundle as a downgrade the customer may install over a newer version."),
    ] = False,
    license_id: Annotated[
        str | None,
        typer.Option(
            "--license-id",
            help="The customer's license whose machines (and, for a model, terms) the bundle takes (default: the latest).",
        ),
    ] = None,
    fingerprint: Annotated[
        bool,
        typer.Option("--fingerprint/--no-fingerprint", help="Embed the customer's weight fingerprint (models, GGUF adapters)."),
    ] = True,
    base_model: Annotated[
        Path | None,
        typer.Option(
            "--base-model",
            help="Adapters: the customer's model it is for (their .moat, or a plain file); default: the model of the license used.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Build a signed update bundle of a model, an adapter or a knowledge pack for one customer."""
    from ..trace.fingerprint import fingerprint_model
    from ..updates.release import release
    from ..updates.bundle import label
    from ..vault.vendor import Vendor

    given = [(k, p) for k, p in (("model", model), ("adapter", adapter), ("knowledge-pack", knowledge_pack)) if p]
    if len(given) != 1:
        raise CodemoatError("give exactly one of --model, --adapter or --knowledge-pack")
    kind, source = given[0]
    check_writable(out, force)
    fp = fingerprint_model if kind in ("model", "adapter") and fingerprint else None
    with Vendor.open(vendor) as v:
        m = release(
            v,
            customer=customer,
            kind=kind,
            source=source,
            version=version,
            out=out,
            name=name,
            notes=notes,
            replaces=replaces,
            rollback_target=rollback_target,
            fingerprint=fp,
            license_id=license_id,
            base_model=base_model,
        )
    d = {
        k: m[k]
        for k in ("bundle_id", "kind", "name", "version", "released_at", "replaces", "rollback_target", "customer", "machines")
    } | {"file": str(out), "size": out.stat().st_size}
    emit(
        d,
        as_json,
        lambda d: say(f"released {label(d)} for {d['customer']} ({len(d['machines'])} machine(s)) -> {out}", markup=False),
    )


def _store():
    from ..config import load_settings
    from ..updates.store import UpdateStore

    s = load_settings(None)
    log = open_audit_log(s)

    def audit(step: str, detail: dict[str, Any]) -> None:
        log.append("update", user="admin", route=f"update {step}", detail=detail)

    # an adapter bundle must be for this model or the installed one (which `update:model` names)
    models = [Path(s.model.path)] if s.model.path and not s.model.path.startswith("update:") else []
    return UpdateStore(audit=audit, models=models)


@update_app.command("verify")
def update_verify(
    file: Annotated[Path, typer.Argument(help="An update bundle (.moatpkg).")],
    license: LicenseOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Check a bundle without installing it: signature, customer, machine, support window, version, payload."""
    r = _store().verify(file, license)
    from ..updates.bundle import label
    from ..vault.clock import iso

    b = r["bundle"]
    emit(
        r,
        as_json,
        lambda d: say(
            f"ok: {label(b)} (released {iso(b['released_at'])}) may be installed; "
            f"installed now: {d['installed'] or 'none'}; support until {d['support_until']}",
        ),
    )


@update_app.command("apply")
def update_apply(
    file: Annotated[Path, typer.Argument(help="An update bundle (.moatpkg).")],
    license: LicenseOpt = None,
    groups: Annotated[
        str | None,
        typer.Option(
            "--groups",
            help="Knowledge packs and adapters: comma-separated groups that may read (or are served with) it "
            "(default: as before, else everyone).",
        ),
    ] = None,
    swap: SwapOpt = True,
    as_json: JsonFlag = False,
) -> None:
    """Install a bundle atomically (a crash leaves the previous version serving), then swap it into the running server."""
    from ..index.update import parse_groups
    from ..updates.bundle import channel
    from ..updates.handoff import hand_over
    from ..updates.bundle import label

    store = _store()
    r = store.apply(file, license, parse_groups(groups) if groups is not None else None)
    if swap and r["kind"] in ("model", "adapter"):
        chan = channel(r["kind"], r["name"])
        r["served"] = _settle(store, chan, r["bundle_id"], _lost_swaps(store, chan, r["bundle_id"], hand_over(chan)))

    def human(d: dict[str, Any]) -> None:
        line = f"installed {label(d)}" + (f" (was {d['previous']})" if d["previous"] else "")
        if d.get("index"):
            line += f"; indexed {d['index']['chunks']} chunks as {d['index']['source']}"
        _report(line, d.get("served"))

    _emit_served(r, as_json, human)


def _lost_swaps(store, chan: str, bundle_id: str, served: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A serve that closed the hand-off without an answer ended during the swap (killed, out of memory), and one
    that stopped sending its progress lines is hung or stopped there (updates.handoff): the version it was checking
    never passed, so it is recorded failed and the one before it is current again (store.fail), unless another
    serve's check passed it meanwhile. Its answer says so."""
    for a in served:
        if a.get("lost"):
            if a.get("silent"):
                why, said = f"server pid {a.get('pid')} stopped answering during the swap", a.get("error", "")
            else:
                why, said = f"server pid {a.get('pid')} ended during the swap", "it ended during the swap, without an answer"
            back = store.fail(chan, bundle_id, why, only_pending=True)
            a["error"] = said
            if back is not None:
                a["error"] += f"; recorded as failed, the store is back on {back['version'] or 'no version'}"
    return served


def _settle(store, chan: str, bundle_id: str, served: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A serve whose check of `bundle_id` failed rolled the store back (store.fail) after others had swapped it in:
    those served a version `update list` no longer named current (nor did their next start). They are handed the
    store's current version again, once; their answers say so (`back`). One asked after the failure already has the
    store's version and is not asked again; when the failed version was the channel's first, there is none to go back
    to, and a serve that swapped it in is named as failed (restart it)."""
    from ..updates.handoff import hand_over

    cur = store.current(chan)
    if cur is not None and cur["bundle_id"] == bundle_id:
        return served

    def stale(a: dict[str, Any]) -> bool:
        return bool(a.get("ok") and a.get("swapped") and (cur is None or a.get("version") != cur["version"]))

    if not any(stale(a) for a in served):
        return served
    if cur is None:
        why = "its version failed another server's check and no version before it is installed: restart this server"
        return [dict(a, ok=False, error=why) if stale(a) else a for a in served]
    again = {a.get("pid"): dict(a, back=True) for a in hand_over(chan, pids={a.get("pid") for a in served if stale(a)})}
    return [again.get(a.get("pid"), a) if stale(a) else a for a in served]


def _report(line: str, served: list[dict[str, Any]] | None) -> None:
    """`line` and what each running serve made of the hand-off: one line (on stderr when one failed)."""
    if served is not None and not served:
        line += "; no server is running on this home: it serves from the next start"
    for a in served or []:
        if a.get("ok") and a.get("relayed") is not None:
            line += f"; vaultd pid {a['pid']} passed it on to {a['relayed']} connected serve(s), which swap it in"
        elif a.get("ok") and a.get("swapped") and a.get("back"):
            line += f"; server pid {a['pid']} had swapped it in, and is back on {a.get('version')} with the store"
        elif a.get("ok") and a.get("swapped"):
            line += f"; server pid {a['pid']} serves it now (swapped in {a.get('seconds', '?')} s)"
        elif a.get("ok"):
            line += f"; server pid {a['pid']} left as it is: {a.get('reason')}"
    failed = [a for a in served or [] if not a.get("ok")]
    if failed:
        print_error(f"{line}; but server pid {failed[0]['pid']} could not serve it: {failed[0].get('error')}")
    else:
        say(line, markup=False)  # a serve's reason, a bundle's name: text, not markup


def _emit_served(r: dict[str, Any], as_json: bool, human) -> None:
    failed = [a for a in r.get("served", []) if not a.get("ok")]
    if failed:
        emit_failed(r, as_json, human, f"server pid {failed[0]['pid']} could not serve it: {failed[0].get('error')}")
    emit(r, as_json, human)


@update_app.command("list")
def update_list(as_json: JsonFlag = False) -> None:
    """Installed bundles: the current version of each model, adapter and pack, and those kept for rollback."""
    rows = _store().list()

    def human(rows: list[dict[str, Any]]) -> None:
        from rich.markup import escape

        from ..vault.clock import iso

        if not rows:
            console.print("no update bundles installed")
            return
        t = table("channel", "version", "current", "released", "installed", "notes")
        for r in rows:
            t.add_row(
                r["channel"],
                r["version"],
                ("yes, " + r["status"] if r.get("status") else "yes") if r["current"] else r.get("status", ""),
                iso(r["released_at"]),
                iso(r["installed_at"]),
                escape(r.get("notes") or ""),  # the vendor's text, not markup ("[/]" in it failed every list)
            )
        console.print(t)

    emit(rows, as_json, human)


@update_app.command("rollback")
def update_rollback(
    channel: Annotated[
        str | None, typer.Option(help="model, adapter:NAME or knowledge-pack:NAME (default: the last one applied).")
    ] = None,
    swap: SwapOpt = True,
    as_json: JsonFlag = False,
) -> None:
    """Go back to the version installed before the current one (and hand it to the running server)."""
    from ..updates.handoff import hand_over

    store = _store()
    r = store.rollback(channel)
    if swap and (r["channel"] == "model" or r["channel"].startswith("adapter:")):
        chan, bid = r["channel"], r["bundle_id"]
        r["served"] = _settle(store, chan, bid, _lost_swaps(store, chan, bid, hand_over(chan)))
    _emit_served(r, as_json, lambda d: _report(f"{d['channel']}: {d['from']} -> {d['version']}", d.get("served")))


@vendor_app.command("channel")
def vendor_channel(
    folder: Annotated[Path, typer.Option("--dir", help="Folder of released bundles (.moatpkg) to publish.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0 picks a free one).")] = 8470,
) -> None:
    """Publish released bundles over HTTP for customers who turned the online channel on (GET /index.json)."""
    from ..updates.channel import make_server

    from ..config.serving import bind_host, http_url, netloc

    try:
        bind_host(host)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--host") from None
    if not folder.is_dir():
        raise CodemoatError(f"not a folder: {folder}")
    try:
        srv = make_server(folder, host, port)
    except (OSError, TypeError, ValueError) as e:  # a port taken, an address not ours or none: one line, as serve's
        raise CodemoatError(f"cannot listen on {netloc(host, port)}: {getattr(e, 'strerror', None) or e}") from None
    # markup off: an IPv6 address in brackets is no rich markup tag ("[fe80::1]" vanished), nor is a folder's name
    console.print(f"update channel on {http_url(host, srv.server_address[1])}/ serving {folder}", highlight=False, markup=False)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


@update_app.command("fetch")
def update_fetch(
    channel: Annotated[
        str | None, typer.Option(help="The vendor's channel URL (default: update.channel_url; unset: off).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Download new bundles from the vendor's online channel into $CODEMOAT_HOME/updates/inbox/ (then `update apply`)."""
    from .. import paths
    from ..config import load_settings
    from ..updates.channel import fetch

    url = channel or load_settings(None).update.channel_url
    if not url:
        raise CodemoatError("no update channel configured (update.channel_url is off by default; bundles also come as files)")
    try:  # 'http://[::1' or a port past 65535 raised ValueError in urlsplit, which reached main's last resort
        from urllib.parse import urlsplit

        _ = urlsplit(url).port
    except ValueError as e:
        raise CodemoatError(f"update channel URL {url!r} must be http(s)://HOST[:PORT]/PATH ({e})") from None
    got = fetch(url, paths.home() / "updates" / "inbox")
    emit(
        got,
        as_json,
        lambda rows: console.print(
            "\n".join(f"fetched {r['file']} ({r['size']} bytes)" for r in rows) or "no new bundles", highlight=False
        ),
    )
