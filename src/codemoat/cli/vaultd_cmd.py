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

    async def stream(self, prompt, params):  # pragma: no cover - never called
        raise RuntimeError("the vault daemon does not generate")
        yield

    def close(self) -> None:
        if self.buf is None:
            return
        if not self.quiet:
            self._on_close()
        # zeroing through our mapping also empties the pages a serve that ignored the unload still maps
        self.buf.close(zero=not self.quiet)
        self.buf = None


def _uid(value: str) -> int:
    import pwd

    from ..errors import CodemoatError

    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise CodemoatError(f"--allow-uid {value}: no such user") from None


def _gid(value: str) -> int:
    import grp

    from ..errors import CodemoatError

    if value.isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise CodemoatError(f"--allow-group {value}: no such group") from None


def open_models(models: list[Path], licenses: list[Path], daemon, settings) -> list:
    """Verify and decrypt each licensed model once, offering its memfd on `daemon`; returns the holders."""
    from dataclasses import asdict

    from ..engines.sealed import open_sealed
    from ..vault.daemon import Offer

    holders: list = []
    for model, lic in zip(models, licenses):
        facts: dict = {}  # shared with the offer: the license's facts are added once open_sealed returns
        ref: list = []  # the holder, whose `reason` says why a copy was withdrawn

        def build(settings, buf, model_id, parts, facts=facts, ref=ref):
            facts["parts"] = {k: list(v) for k, v in parts.items()}
            facts["sha256"] = buf.sha256  # the signed header's plaintext digest (an adapter's base check)
            # serve watermarks with the customer's key, read when it asks (a renewed lease may bring it again)
            daemon.offer(
                Offer(model_id, buf.fd, buf.size, facts, watermark_key=lambda ref=ref: ref[0].watermark_key if ref else None)
            )

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
        holders.append(holder)
    return holders


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


def relay_updates(daemon):
    """`update apply` in vaultd's home (its account owns the update store) cannot reach the `serve --vault`s,
    which run elsewhere as another user: listen on $CODEMOAT_HOME/run/vaultd-PID.sock like a serve, and
    pass a new adapter version on to every connected serve, which swaps it in (fetching it from here)."""
    from ..updates.handoff import Listener

    def handle(channel: str) -> dict:
        if channel == "model":
            return {"swapped": False, "reason": "vaultd holds the model it was started with: restart it with the installed one"}
        n = daemon.announce({"op": "update", "channel": channel})
        return {"swapped": False, "relayed": n, "channel": channel}

    try:
        return Listener(handle, role="vaultd").start()
    except OSError as e:
        import logging

        logging.getLogger("codemoat.vault").warning("cannot listen for `update apply` (%s): serves swap by the admin route", e)
        return None


@app.command()
def vaultd(
    *,
    socket: Annotated[str, typer.Option(help="Unix socket to listen on (PATH or unix:PATH); mode 0660.")],
    model: Annotated[list[Path], typer.Option(help="Sealed model (.moat); repeat with --license for several.")],
    license: Annotated[list[Path], typer.Option(help="License (.lic) for the --model at the same position.")],
    allow_uid: Annotated[list[str] | None, typer.Option(help="User (name or uid) allowed to fetch models; repeatable.")] = None,
    allow_group: Annotated[
        list[str] | None, typer.Option(help="Group allowed to fetch models; the first also owns the socket.")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML configuration file.", envvar="CODEMOAT_CONFIG")] = None,
) -> None:
    """Hold the machine key: decrypt licensed models once and hand them to `serve --vault` as sealed memfds."""
    import signal
    import threading

    from ..config import load_settings
    from ..errors import CodemoatError
    from ..vault.daemon import VaultDaemon, socket_path
    from .serve_cmd import log_to_stderr

    if len(model) != len(license):
        raise CodemoatError(f"give one --license per --model ({len(model)} models, {len(license)} licenses)")
    uids = {_uid(u) for u in allow_uid or []}
    gids = [_gid(g) for g in allow_group or []]
    if not uids and not gids:
        raise CodemoatError("nobody may fetch models: give --allow-uid or --allow-group")
    settings = load_settings(config)
    log_to_stderr(settings.server.log_level)
    adapters = VendorAdapters()  # `model.adapters = ["update:NAME"]` of a serve --vault
    daemon = VaultDaemon(
        socket_path(socket), allow_uids=uids, allow_groups=set(gids), group=gids[0] if gids else None, resolve=adapters
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    holders = open_models(model, license, daemon, settings)
    relay = None
    try:
        daemon.start()
        relay = relay_updates(daemon) if settings.update.handoff else None
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
