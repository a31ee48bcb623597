"""`codemoat vaultd`: the key-holding daemon; `serve --vault unix:PATH` gets models from it as sealed memfds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .apps import app
from .common import console


class HeldCopy:
    """What the daemon's model holder keeps in place of an engine: the sealed memfd itself.

    The license watch and lease keeper of `open_sealed` unload it on expiry, revocation or lease
    loss; closing tells every connected serve to unload, then zeroes the daemon's copy."""

    state = "ready"
    in_flight = 0  # not an engine: nothing streams through it
    on_incident = None

    def __init__(self, buf, on_close):
        self.buf, self._on_close = buf, on_close
        #: set when vaultd stops under an offline license: serves keep what they hold, nothing is zeroed
        self.quiet = False
        #: zero the pages on close (None: unless quiet); a copy no serve was given is zeroed quietly
        self.zero: bool | None = None

    async def stream(self, prompt, params):  # pragma: no cover - never called
        raise RuntimeError("the vault daemon does not generate")
        yield

    def close(self) -> None:
        if self.buf is None:
            return
        if not self.quiet:
            self._on_close()
        # zeroing through our mapping also empties the pages a serve that ignored the unload still maps
        self.buf.close(zero=not self.quiet if self.zero is None else self.zero)
        self.buf = None


def let_go(holder, *, zero: bool) -> None:
    """Close a holder of vaultd's without telling the serves to unload (a model swapped out or refused):
    the serves hold descriptors of their own, so a swapped-out copy's pages go with the last of them."""
    held = holder._engine
    if isinstance(held, HeldCopy):
        held.quiet, held.zero = True, zero
    holder.close()


def _uid(value: str) -> int:
    import pwd

    from ..errors import CodemoatError

    if value.isascii() and value.isdigit():  # str.isdigit() is true of '²', which int() refuses
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise CodemoatError(f"--allow-uid {value}: no such user") from None


def _gid(value: str, flag: str = "--allow-group") -> int:
    import grp

    from ..errors import CodemoatError

    if value.isascii() and value.isdigit():  # str.isdigit() is true of '²', which int() refuses
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise CodemoatError(f"{flag} {value}: no such group") from None


def allow_lists(users: list[str], groups: list[str]) -> tuple[set[int], set[int], dict[str, tuple[set[int], set[int]]]]:
    """`--allow-uid`/`--allow-group` values → (uids, gids for every model, {model id: (uids, gids) for it alone}).
    `NAME` may fetch every model; `MODEL_ID=NAME` that model only (split at the last `=`: no user or
    group name holds one)."""
    uids: set[int] = set()
    gids: set[int] = set()
    per: dict[str, tuple[set[int], set[int]]] = {}
    for values, parse, mine, slot in ((users, _uid, uids, 0), (groups, _gid, gids, 1)):
        for value in values:
            model, eq, name = value.rpartition("=")
            if eq and not (model and name):
                from ..errors import CodemoatError

                raise CodemoatError(f"{value!r}: give NAME, or MODEL_ID=NAME for one model")
            (per.setdefault(model, (set(), set()))[slot] if eq else mine).add(parse(name))
    return uids, gids, per


def model_ids(models: list[Path]) -> set[str]:
    """The ids the models will be served under, read from their signed headers (nothing decrypted)."""
    from ..engines.loader import INSTALLED, installed_model
    from ..vault.container import SealedFile

    return {SealedFile(installed_model(None)[0] if str(m) == INSTALLED else m).manifest.model_id for m in models}


def open_models(models: list[Path], licenses: list[Path], daemon, settings, audit=None) -> list:
    """Verify and decrypt each licensed model once, offering its memfd on `daemon`; returns the holders."""
    from ..engines.loader import INSTALLED

    holders: list = []
    lics = iter(licenses)
    for model in models:
        if str(model) == INSTALLED:  # the installed model bundle's current version and its own license
            from ..updates.store import UpdateStore

            holder, offer = open_installed(daemon, settings, UpdateStore(audit=audit))
        else:
            holder, offer = open_one(model, next(lics), daemon, settings)
        daemon.offer(offer)
        holders.append(holder)
    return holders


def update_auditor(settings):
    """audit(step, detail) for vaultd's update store (its home's): into its home's audit log (`via:
    vaultd`; opened at the first record; a log that cannot take it costs a warning, not the model)."""
    import logging

    from .common import open_audit_log

    opened: list = []

    def audit(step: str, detail: dict) -> None:
        try:
            if not opened:
                opened.append(open_audit_log(settings))
            opened[0].append("update", user="admin", route=f"update {step}", detail=dict(detail, via="vaultd"))
        except Exception as e:
            logging.getLogger("codemoat.vault").warning("could not audit update %s %s: %s", step, detail, e)

    return audit


def open_installed(daemon, settings, store) -> tuple:
    """`--model update:model`: the update store's current model version, as `open_one` opens a file.
    vaultd's serves run elsewhere without the store, so a version still pending (no health check passed
    it) is checked here before it is offered (updates.vaultcheck, in a child process): passed, it is
    confirmed; failed to open or to answer, it is recorded failed and the version before it is tried
    (as serve's start does, engines.loader.open_installed). Each start counts its try of a pending
    version first (store.start_attempt): one that ended vaultd `update.start_attempts` times while it
    was decrypted is failed without being opened."""
    import logging
    from dataclasses import asdict

    from ..engines.loader import installed_model
    from ..errors import CodemoatError
    from ..updates.store import KEEP, hold
    from ..updates.vaultcheck import check_offer

    log = logging.getLogger("codemoat.vault")
    for _ in range(KEEP + 2):  # the current version, then each one kept before it
        for gone in store.start_attempt("model", settings.update.start_attempts):
            log.warning("installed model %s: %s; going back to the version before it", gone["version"], gone["reason"])
            if store.current("model") is None:
                raise CodemoatError(f"installed model {gone['version']}: {gone['reason']}; no version before it is installed")
        path, lic, bundle = installed_model(None, store)
        hold("start")  # tests only: vaultd killed here, its try of a pending version counted
        pending = store.pending("model", bundle.bundle_id)
        try:
            holder, offer = open_one(path, lic, daemon, settings, asdict(bundle))
        except Exception as e:
            if not pending:
                raise
            why = f"it failed to load at vaultd's start: {(str(e) or type(e).__name__).splitlines()[0][:300]}"
        else:
            failed = check_offer(offer, settings) if pending else None
            if failed is None:
                if pending:
                    store.confirm("model", bundle.bundle_id)
                return holder, offer
            let_go(holder, zero=True)  # never handed out
            why = f"its health check at vaultd's start failed: {failed}"
        log.warning("installed model %s was never checked: %s; going back to the version before it", bundle.version, why)
        store.audit("swap_failed", model="installed", version=bundle.version, reason=why)
        store.fail("model", bundle.bundle_id, why)
        if store.current("model") is None:
            raise CodemoatError(f"installed model {bundle.version}: {why}; no version before it is installed")
    raise CodemoatError("no installed model version could be loaded (`codemoat update list`)")


def open_one(model: Path, lic: Path, daemon, settings, bundle: dict | None = None) -> tuple:
    """Verify and decrypt one licensed model into a sealed memfd: (its holder, the Offer to make). A
    reload of the holder later (a regained lease) offers again by itself."""
    from dataclasses import asdict

    from ..engines.sealed import open_sealed
    from ..vault.daemon import Offer

    facts: dict = {}  # shared with the offer: the license's facts are added once open_sealed returns
    ref: list = []  # the holder, whose `reason` says why a copy was withdrawn
    first: list = []  # the first Offer, made by the caller once it has checked the holder

    def build(settings, buf, model_id, parts):
        facts["parts"] = {k: list(v) for k, v in parts.items()}
        facts["sha256"] = buf.sha256  # the signed header's plaintext digest (an adapter's base check)
        # serve watermarks with the customer's key, read when it asks (a renewed lease may bring it again)
        offer = Offer(model_id, buf.fd, buf.size, facts, watermark_key=lambda: ref[0].watermark_key if ref else None)
        if ref:
            daemon.offer(offer)
        else:
            first.append(offer)

        def withdraw() -> None:
            daemon.revoke(model_id, (ref[0].reason if ref else "") or "withdrawn by the vault daemon")

        return HeldCopy(buf, withdraw)

    holder = open_sealed(model, lic, settings=settings, build=build)
    ref.append(holder)
    if holder.status.license is not None:
        facts["license"] = asdict(holder.status.license)
    if holder.keeper is not None:  # what a serve that loses vaultd may keep serving for (the lease rules)
        k = holder.keeper.describe()
        facts["lease_rules"] = {"ttl": k["ttl"], "grace": k["grace"]}
    if bundle is not None:
        facts["bundle"] = bundle  # serve's /health names the installed version
    return holder, first[0]


class VendorAdapters:
    """`update:NAME` for `serve --vault`: the installed version of vendor adapter NAME (sealed to this
    machine's key, which only vaultd reads), decrypted into a sealed memfd at the first request and
    again when `update apply` has installed a newer one; the older copy is closed (the serves that
    fetched it hold their own descriptor)."""

    PREFIX = "update:"

    def __init__(self) -> None:
        import threading

        self._held: dict[str, object] = {}
        self._lock = threading.Lock()

    def __call__(self, model_id: str):
        import dataclasses
        import os

        from ..engines.memfd import MemfdBuffer
        from ..updates.adapters import current, open_installed
        from ..vault.daemon import Offer

        if not model_id.startswith(self.PREFIX):
            return None
        name = model_id[len(self.PREFIX) :]
        with self._lock:
            held = self._held.get(name)
            if held is not None and held[0].facts["bundle_id"] == current(name)["bundle_id"]:
                return dataclasses.replace(held[0], fd=os.dup(held[0].fd))  # the daemon's to close once sent
            a = open_installed(name)
            buf = MemfdBuffer.from_bytes(a.gguf, name=f"codemoat-adapter-{name}")
            facts = {
                "kind": "adapter",
                "name": a.name,
                "version": a.version,
                "bundle_id": a.bundle_id,
                "groups": list(a.groups),
                "base_sha256": a.base_sha256,  # serve checks it against the base it serves
            }
            self._held[name] = (Offer(model_id, buf.fd, buf.size, facts), buf)
            if held is not None:  # answers being sent hold their own copies of its descriptor
                held[1].close(zero=False)
            return dataclasses.replace(self._held[name][0], fd=os.dup(buf.fd))

    def close(self) -> None:
        with self._lock:
            for _, buf in self._held.values():
                buf.close(zero=False)
            self._held.clear()


def swap_installed_model(daemon, holders: list, settings, audit=None) -> dict:
    """A model bundle `update apply` (or `update rollback`) made current in vaultd's home: verify its
    license and container as at start (open_sealed: signature, machine, dates), decrypt it once into a
    new sealed memfd, offer it under the id of the held model it replaces (same model id, same customer,
    else refused and the old one serves on), let the old copy go, and tell the connected serves, which
    swap to it. The notice names only the channel: what is swapped in is read from vaultd's own store.
    A pending version (no health check passed it yet) is checked before it is offered (updates.vaultcheck):
    passed, it is confirmed; failed, it is refused, recorded failed, and the store goes back to the
    version before it (the serves never see it)."""
    from dataclasses import asdict

    from ..engines.loader import installed_bundle
    from ..errors import CodemoatError
    from ..updates.bundle import label
    from ..updates.store import UpdateStore
    from ..updates.vaultcheck import check_offer

    store = UpdateStore(audit=audit)  # one per swap: a store's lock is re-entrant in its own thread only
    cur = store.current("model")
    if cur is None:
        raise CodemoatError("no model bundle is installed in vaultd's home (`codemoat update apply FILE`)")
    d = Path(cur["dir"])
    try:
        fresh, offer = open_one(d / "model.moat", d / "model.lic", daemon, settings, asdict(installed_bundle(cur)))
    except CodemoatError as e:
        raise CodemoatError(f"vaultd refused {label(cur)}, and serves the model it holds on: {e}") from None
    old = next((h for h in holders if h.model_id == fresh.model_id), None)
    who = [h.status.license.customer if h.status.license else None for h in (old, fresh) if h is not None]
    why = None
    if old is None:
        why = f"it is model {fresh.model_id!r}; vaultd holds {', '.join(h.model_id for h in holders)}"
    elif who[0] != who[1]:
        why = f"it is licensed to {who[1]!r}, and vaultd serves {who[0]!r}'s model"
    if why is None and store.pending("model", cur["bundle_id"]):
        failed = check_offer(offer, settings)
        if failed is None:
            store.confirm("model", cur["bundle_id"])
        else:
            why = f"its health check in vaultd failed: {failed}"
            store.audit("swap_failed", model="installed", version=cur["version"], reason=why)
            back = store.fail("model", cur["bundle_id"], why)
            if back is not None:
                why += f"; recorded as failed, the store is back on {back['version'] or 'no version'}"
    if why is not None:
        let_go(fresh, zero=True)  # never handed out
        raise CodemoatError(f"vaultd refused {label(cur)}, and serves the model it holds on: {why}")
    daemon.offer(offer)  # under the same id: every fetch from now on gets the new copy
    holders[holders.index(old)] = fresh
    let_go(old, zero=False)  # vaultd keeps at most the old and the new copy, and the old only until here
    n = daemon.announce({"op": "update", "channel": "model", "model": fresh.model_id})  # its callers only
    return {"swapped": False, "relayed": n, "channel": "model", "version": cur["version"]}


def relay_updates(daemon, holders: list, settings, audit=None):
    """`update apply` in vaultd's home (its account owns the update store) cannot reach the `serve --vault`s,
    which run elsewhere as another user: listen on $CODEMOAT_HOME/run/vaultd-PID.sock like a serve (its
    account or root only, updates.handoff), and pass a new adapter version on to every connected serve,
    which swaps it in (fetching it from here); a new model version is first taken in here.

    An adapter version is installed pending (updates.store) until a check passes it; in vaultd's home the
    serves check it as they swap it in, and their outcome does not come back here, so vaultd confirms it once
    it has passed it on to at least one serve (else `update list` named it pending for good)."""
    from ..updates.handoff import Listener
    from ..updates.store import UpdateStore

    def handle(channel: str) -> dict:
        if channel == "model":
            return swap_installed_model(daemon, holders, settings, audit)
        store = UpdateStore(audit=audit)
        cur = store.current(channel)  # the version announced (one installed meanwhile is not confirmed with it)
        n = daemon.announce({"op": "update", "channel": channel})
        if n and cur is not None:
            store.confirm(channel, cur["bundle_id"])  # a no-op unless it is still current and pending
        return {"swapped": False, "relayed": n, "channel": channel}

    try:
        # a new model version is loaded here, as in a serve: `update.swap_stall_s` bounds that stage here too
        return Listener(handle, role="vaultd", stall_s=settings.update.swap_stall_s).start()
    except OSError as e:
        import logging

        logging.getLogger("codemoat.vault").warning("cannot listen for `update apply` (%s): serves swap by the admin route", e)
        return None


@app.command()
def vaultd(
    *,
    socket: Annotated[str, typer.Option(help="Unix socket to listen on (PATH or unix:PATH); mode 0660.")],
    model: Annotated[
        list[Path],
        typer.Option(
            help="Sealed model (.moat), or update:model (the installed model bundle, with its own license); repeatable."
        ),
    ],
    license: Annotated[list[Path] | None, typer.Option(help="License (.lic) for each --model file, in the same order.")] = None,
    allow_uid: Annotated[
        list[str] | None,
        typer.Option(help="User (name or uid) allowed to fetch models (MODEL_ID=USER: that model only); repeatable."),
    ] = None,
    allow_group: Annotated[
        list[str] | None,
        typer.Option(help="Group allowed to fetch models (MODEL_ID=GROUP: that model only); the first owns the socket."),
    ] = None,
    socket_group: Annotated[
        str | None, typer.Option(help="Group that owns the socket (default: the first --allow-group).")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML configuration file.", envvar="CODEMOAT_CONFIG")] = None,
) -> None:
    """Hold the machine key: decrypt licensed models once and hand them to `serve --vault` as sealed memfds."""
    import logging
    import signal
    import threading

    from ..config import load_settings
    from ..engines.loader import INSTALLED
    from ..errors import CodemoatError
    from ..vault.daemon import VaultDaemon
    from ..vault.wire import socket_path
    from .serve_cmd import log_to_stderr

    license = license or []
    files = [m for m in model if str(m) != INSTALLED]
    if len(files) != len(license):
        raise CodemoatError(f"give one --license per --model file ({len(files)} files, {len(license)} licenses)")
    uids, gids, per_model = allow_lists(allow_uid or [], allow_group or [])
    if not uids and not gids and not per_model:
        raise CodemoatError("nobody may fetch models: give --allow-uid or --allow-group")
    first = (allow_group or [""])[0].rpartition("=")[2]
    group = _gid(socket_group, "--socket-group") if socket_group else (_gid(first) if first else None)
    settings = load_settings(config)
    log_to_stderr(settings.server.log_level)
    adapters = VendorAdapters()  # `model.adapters = ["update:NAME"]` of a serve --vault
    daemon = VaultDaemon(
        socket_path(socket), allow_uids=uids, allow_groups=gids, group=group, resolve=adapters, per_model=per_model
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if per_model:  # a typo would leave a model nobody may fetch: refused before any decryption
        ids = model_ids(model)
        if unknown := sorted(m for m in per_model if m not in ids and not m.startswith(VendorAdapters.PREFIX)):
            raise CodemoatError(
                f"--allow-uid/--allow-group {unknown[0]}=...: vaultd holds no such model ({', '.join(sorted(ids))})"
            )
    audit = update_auditor(settings)
    holders = open_models(model, license, daemon, settings, audit)
    from ..engines.memfd import huge_pages_allowed, shmem_thp_mode

    if not huge_pages_allowed():  # every serve start maps the memfd: 4 KiB shmem pages cost it (bench/results/vaultd.md)
        logging.getLogger("codemoat.vault").warning(
            "shmem_enabled=%s: each serve start maps this memfd's 4 KiB pages, slower than a plaintext start; "
            "'advise' lets vaultd use 2 MiB pages (docs/operations.md, huge pages)",
            shmem_thp_mode(),
        )
    relay = None
    try:
        daemon.start()
        relay = relay_updates(daemon, holders, settings, audit) if settings.update.handoff else None
        names = ", ".join(h.model_id for h in holders)
        console.print(f"codemoat vaultd holding [bold]{names}[/bold] on unix:{daemon.path}", highlight=False)
        while not stop.wait(1.0):
            pass
    finally:
        # Stopping vaultd: under an offline license running serves keep their model (they cannot load
        # again until vaultd is back); a lease is given back, so its serves are told to unload.
        daemon.withdraw_all("the vault daemon is stopping")  # nothing handed out once the copies close
        for h in holders:
            held = h._engine
            if isinstance(held, HeldCopy) and h.status.license is not None and h.status.license.license_mode != "lease":
                held.quiet = True
            h.close()
        if relay is not None:
            relay.close()
        daemon.close()
        adapters.close()
    console.print("codemoat vaultd stopped", highlight=False)
