"""Serving an installed update without a restart: the swap behind `POST /admin/api/model/swap` and
behind `codemoat update apply` (its hand-off socket, updates.handoff, started with the app).

`swap_installed(app, channel, audit)` swaps in the update store's current version of `model` or
`adapter:NAME` (engines.loader: the new engine is loaded beside the served one, a fixed prompt must
produce tokens, then it takes new requests while in-flight ones finish on the old one). When the load
or that health check fails, the old engine serves on and, while no serve has checked the version
(pending), the store is rolled back with it: the version before is current again and the failed one is
recorded as failed (`update list`). A model or adapter version another serve's check passed stays
current: one serve's failure (its own memory or device, its own base model) is reported as this serve's,
not made everyone's. Every outcome is audited (`update swapped`, `update swap_failed`, `update
swap_rolled_back`). A swap that passed confirms the version in the store (no longer pending: `update
confirmed`). Under `update apply`'s hand-off the swap tells its stage (updates.handoff.stage). A version
recorded failed while this serve loaded it (apply gave up on a slow swap, another serve's check failed it
first) is not served on when its check here passes: the serve goes to the store's version.

`check_installed_at_start(app)` is the same check at serve's start with `model.path = update:model`:
a version still pending is health-checked before any request; on failure the version before it is
swapped in (and checked) and the failed one recorded, as for a swap, unless another serve's check
passed it meanwhile (the store keeps it; this serve serves an earlier kept version, for itself only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..errors import CodemoatError

log = logging.getLogger("codemoat.serve")

Audit = Callable[..., None]  # audit(step, **detail)


def swap_installed(app: Any, channel: str, audit: Audit, *, add_adapter: bool = False) -> dict[str, Any]:
    """Serve `channel`'s installed version now; `{"swapped": False, "reason"}` when this server does not
    serve that channel (an adapter not in `model.adapters` unless `add_adapter`, a model held by vaultd)."""
    from pathlib import Path

    from ..engines.loader import SwapBusy, installed_bundle, swap_adapter, swap_model
    from ..updates.bundle import label
    from ..updates.handoff import stage
    from ..updates.store import UpdateStore, hold, model_files

    holder, settings = app.state.holder, app.state.service.settings
    store = UpdateStore(audit=lambda step, d: audit(step, **d))
    name = channel.split(":", 1)[1] if channel.startswith("adapter:") else None
    what = {"adapter": name} if name else {"model": "installed"}
    if name is not None and settings.vault.socket:  # vaultd keeps the store and hands the current version
        return _swap_vaulted_adapter(holder, settings, name, audit)
    cur = store.current(channel)
    if cur is None:
        why = f"no adapter bundle named {name!r} is installed" if name else "no model bundle is installed"
        audit("swap_failed", **what, reason=why)
        raise CodemoatError(f"{why} (`codemoat update apply FILE`)")
    if name is None and settings.vault.socket:
        return {"channel": channel, "version": cur["version"], "swapped": False, "reason": _VAULT}
    if name is not None and not add_adapter and f"update:{name}" not in settings.model.adapters:
        why = f"this server does not serve it (add update:{name} to model.adapters)"
        return {"channel": channel, "version": cur["version"], "swapped": False, "reason": why}
    try:
        stage("loading")  # the new engine is loaded and health-checked (engines.loader: one step)
        hold("swap")  # tests only: a serve killed (or held) here, mid-swap
        if name is None:
            out = swap_model(holder, settings, *model_files(Path(cur["dir"])), installed_bundle(cur))
            app.state.egress_allow = list(holder.status.egress_allow)  # the new license's key server
        else:
            out = swap_adapter(holder, settings, name)
    except SwapBusy as e:
        audit("swap_failed", **what, version=cur["version"], reason=str(e))
        raise
    except Exception as e:
        reason = (str(e) or type(e).__name__).splitlines()[0][:300]
        if not isinstance(e, CodemoatError):
            log.exception("swapping in %s failed", label(cur))
        audit("swap_failed", **what, version=cur["version"], reason=reason)
        stage("recording")
        # only while no serve has checked it: this serve's own failure (its memory, its device, its base model) does
        # not undo, for every serve and the next starts, a version another serve's check passed and serves now
        back = store.fail(channel, cur["bundle_id"], reason, only_pending=True)
        undo = ""
        if back is not None:
            undo = f"; the store is back on {back['version']}" if back["version"] else "; the store no longer lists it"
        elif (now := store.current(channel)) is not None and now["bundle_id"] == cur["bundle_id"]:
            undo = f"; {_KEPT}: this server serves the one before until it restarts"
        raise CodemoatError(f"{label(cur)} failed in the running server, which serves on as before: {reason}{undo}") from None
    out = dict(out, channel=channel, version=cur["version"], swapped=True)
    audit("swapped", **out)
    stage("confirming")
    hold("confirm")  # tests only: the store changed by another process while this serve loaded the version
    if not store.confirm(channel, cur["bundle_id"]):  # its health check passed: no longer pending
        _failed_meanwhile(app, channel, audit, store, cur)
    return out


def _failed_meanwhile(app: Any, channel: str, audit: Audit, store: Any, cur: dict[str, Any]) -> None:
    """A swap passed here, but the store recorded the version failed while this serve loaded it (`update apply`
    gave up on a slow load, STALL_S, or another serve's check failed first), and tidied its files away: serving
    it on served what `update list` names failed, and nothing handed this serve the version the store went
    back to. It swaps that one in (checked, `swap_installed`), or with none, stops serving (503 with why)."""
    from ..updates.bundle import label

    why = _recorded_failed(store, channel, cur["bundle_id"])
    if why is None:
        return  # confirmed already, or replaced by a newer version (whose hand-off comes next)
    now = store.current(channel)
    log.warning("%s passed here but was recorded failed meanwhile (%s): going back to the store's version", label(cur), why)
    said = f"{label(cur)} passed here but was recorded failed meanwhile ({why})"
    if now is not None:
        try:
            back = swap_installed(app, channel, audit)
        except CodemoatError as e:
            raise CodemoatError(f"{said}; going back to the store's version failed too: {str(e).splitlines()[0]}") from None
        raise CodemoatError(f"{said}; this server is back on {back['version']}, the store's version")
    if channel != "model":
        raise CodemoatError(f"{said}; no version before it is installed: restart this server to stop serving it")
    holder = app.state.holder
    holder._loader = None  # nothing reloads the failed version (a lease regained, an adapter swap)
    holder.unload(f"{said} and no version before it is installed")
    raise CodemoatError(f"{said}; no version before it is installed: this server stops serving")


async def check_installed_at_start(app: Any) -> None:
    """serve's start with `model.path = update:model` (run in the lifespan, on the serving loop, before
    any request): the version `engines.loader.open_installed` loaded is health-checked when it is still
    pending (applied while no serve ran, or its swap was cut off); passed, it is confirmed; failed, it is
    recorded failed, the version before it is swapped in (checked too, `swap_installed`), and with no
    version left that passes, the model is unloaded (503 with the reason) rather than served unchecked.

    Serves started together on one pending version each check it: when another serve's check passed it
    (confirmed) before this one's failed, the store keeps it for the fleet (store.fail with only_pending,
    as a swap's failure) and this serve, which must not serve what failed here, serves the newest version
    kept before it that passes its check, for itself only (the store unchanged: `update list` shows the
    fleet's version, /health this serve's), until it restarts or a later swap; with none that passes, it
    unloads with the reason (503). Its next start loads the store's version again, checked then only if
    pending: restart it once its own trouble (memory, device) is fixed, or `update rollback` for all.

    Then each installed adapter it serves (`update:NAME` in `model.adapters`) whose version is pending is
    checked the same way (`_check_adapters_at_start`)."""
    await _check_model_at_start(app)
    await _check_adapters_at_start(app)


async def _check_adapters_at_start(app: Any) -> None:
    """serve's start: a pending vendor adapter the served engine loaded (applied while no serve ran, or
    its swap cut off) is health-checked with the adapter (engines.loader.probe); passed, it is confirmed,
    so that another serve's failure later is that serve's own; failed, it is recorded failed unless another
    serve's check passed it (store.fail with only_pending) and the version the store then has is swapped
    in (checked, `swap_installed`); kept, this serve serves on as it loaded (a failed swap's rule)."""
    import anyio

    from ..engines.adapters import VENDOR_PREFIX
    from ..engines.loader import probe
    from ..updates.store import UpdateStore

    holder, settings = app.state.holder, app.state.settings
    names = [a[len(VENDOR_PREFIX) :] for a in settings.model.adapters if a.startswith(VENDOR_PREFIX)]
    if not names or settings.vault.socket or not holder.loaded:
        return
    audit = _auditor(app, "serve start")
    store = UpdateStore(audit=lambda step, d: audit(step, **d))
    engine = holder.get()
    served = {a.name: a.version for a in getattr(engine, "adapters_served", ())}
    for name in names:
        chan = f"adapter:{name}"
        cur = store.current(chan)
        if cur is None or not cur.get("pending") or served.get(name) != cur["version"]:
            continue  # checked already, or not served (refused at load: its base, its file)
        try:
            await anyio.to_thread.run_sync(lambda: probe(engine, name, loop=holder.loop_token))
        except Exception as e:
            reason = (str(e) or type(e).__name__).splitlines()[0][:300]
            log.warning("installed adapter %s %s failed its health check at start: %s", name, cur["version"], reason)
            audit("swap_failed", adapter=name, version=cur["version"], reason=reason)
            back = store.fail(chan, cur["bundle_id"], f"its health check at serve start failed: {reason}", only_pending=True)
            if back is not None and back["version"]:
                try:
                    await anyio.to_thread.run_sync(lambda: swap_installed(app, chan, audit))
                except CodemoatError as e2:  # audited (and recorded) by swap_installed
                    log.warning("%s", str(e2).splitlines()[0])
            continue
        store.confirm(chan, cur["bundle_id"])


async def _check_model_at_start(app: Any) -> None:
    """`check_installed_at_start`'s model part."""
    import anyio

    from ..engines.loader import INSTALLED, probe
    from ..updates.store import UpdateStore, hold

    holder, settings = app.state.holder, app.state.settings
    if settings.model.path != INSTALLED or settings.vault.socket or holder.status.bundle is None:
        return
    audit = _auditor(app, "serve start")
    for step, detail in getattr(holder, "update_records", ()):  # what open_installed did before the log was open
        audit(step, **detail)
    holder.update_records = []
    store = UpdateStore(audit=lambda step, d: audit(step, **d))
    b = holder.status.bundle
    hold("start_loaded")  # tests only: another serve's check fails it here, while this one has loaded it
    gone = _recorded_failed(store, "model", b.bundle_id)
    if gone is None and not store.pending("model", b.bundle_id):
        return
    if gone is not None:  # failed by another serve's check while this one loaded it: not served unchecked
        await _go_back_at_start(app, store, audit, b, gone)
        return
    try:
        await anyio.to_thread.run_sync(lambda: probe(holder.get(), loop=holder.loop_token))
    except Exception as e:
        reason = (str(e) or type(e).__name__).splitlines()[0][:300]
        log.warning(
            "installed model %s failed its health check at start: %s; going back to the version before it", b.version, reason
        )
        audit("swap_failed", model="installed", version=b.version, reason=reason)
        hold("start_check")  # tests only: another serve confirms it here, as one checking it beside this one would
        store.fail("model", b.bundle_id, f"its health check at serve start failed: {reason}", only_pending=True)
        if await anyio.to_thread.run_sync(lambda: _serve_one_that_passes(app, store, audit, {b.bundle_id})):
            return
        kept = (now := store.current("model")) is not None and now["bundle_id"] == b.bundle_id
        why = f"installed model {b.version} failed its health check ({reason})"
        why += f" ({_KEPT}) and no version kept before it passed here" if kept else " and no version before it passed"
        holder._loader = None  # nothing reloads the failed version (a lease regained, an adapter swap)
        holder.unload(why)
        log.warning("no installed model version passed its health check: not serving (`codemoat update list`)")
        return
    if not store.confirm("model", b.bundle_id) and (gone := _recorded_failed(store, "model", b.bundle_id)) is not None:
        await _go_back_at_start(app, store, audit, b, gone)


async def _go_back_at_start(app: Any, store: Any, audit: Audit, b: Any, why: str) -> None:
    """serve's start: the version it loaded was recorded failed meanwhile (serves starting together, another's
    check failed first, and its files are tidied away): the store's version is served instead, checked, or none."""
    import anyio

    holder = app.state.holder
    said = f"installed model {b.version} was recorded failed while this server loaded it ({why})"
    log.warning("%s: going back to the store's version", said)
    if await anyio.to_thread.run_sync(lambda: _serve_one_that_passes(app, store, audit, {b.bundle_id})):
        return
    holder._loader = None  # nothing reloads the failed version (a lease regained, an adapter swap)
    holder.unload(f"{said} and no version before it passed")
    log.warning("no installed model version passed its health check: not serving (`codemoat update list`)")


def _recorded_failed(store: Any, channel: str, bundle_id: str) -> str | None:
    """Why `bundle_id` was recorded failed (`update list`), when it is no longer `channel`'s current version; else None."""
    now = store.current(channel)
    if now is not None and now["bundle_id"] == bundle_id:
        return None
    return next((f.get("reason") for f in store.failed() if f.get("bundle_id") == bundle_id), None)


_KEPT = "another server's check passed it, so the store keeps it"


def _serve_one_that_passes(app: Any, store: Any, audit: Audit, failed: set[str]) -> bool:
    """serve's start, after its check of the version it loaded failed (`failed`): swap in the store's
    current version when it has not failed here (`swap_installed`: checked, and recorded failed or rolled
    back as any swap), else, the store keeping one another serve checked, the newest version kept before it
    that has not failed here, for this serve only (the store unchanged). False when none passes."""
    from pathlib import Path

    from ..engines.loader import installed_bundle, swap_model
    from ..updates.store import KEEP, model_files

    holder, settings = app.state.holder, app.state.service.settings
    for _ in range(2 * KEEP + 2):  # each swap tried fails one version here, or the store moves back one
        s = store.state()
        ch = s["channels"].get("model") or {}
        cur = ch.get("current")
        if cur is None:
            return False
        if cur not in failed:
            try:
                swap_installed(app, "model", audit)
                return True
            except CodemoatError as e:  # audited, and recorded failed unless another serve's check passed it
                log.warning("%s", str(e).splitlines()[0])
                failed.add(cur)
                continue
        older = [bid for bid in reversed(ch.get("history", [])) if bid not in failed]
        if not older:
            return False
        info = dict(s["bundles"][older[0]], bundle_id=older[0])
        failed.add(older[0])
        try:
            out = swap_model(holder, settings, *model_files(Path(info["dir"])), installed_bundle(info))
        except Exception as e:  # not the store's current version: nothing to record but the audit
            why = (str(e) or type(e).__name__).splitlines()[0][:300]
            audit("swap_failed", model="installed", version=info["version"], reason=why, this_server_only=True)
            log.warning("installed model %s kept before the current one failed here too: %s", info["version"], why)
            continue
        app.state.egress_allow = list(holder.status.egress_allow)
        audit("swapped", **out, channel="model", version=info["version"], swapped=True, this_server_only=True)
        log.warning(
            "installed model %s: %s; this server serves %s, kept before it, until it restarts",
            s["bundles"][cur]["version"],
            _KEPT,
            info["version"],
        )
        return True
    return False


def _swap_vaulted_adapter(holder: Any, settings: Any, name: str, audit: Audit) -> dict[str, Any]:
    """`serve --vault`: the update store is vaultd's; a failed swap leaves it as it is (vaultd's admin rolls back)."""
    from ..engines.loader import swap_adapter

    try:
        out = swap_adapter(holder, settings, name)
    except Exception as e:
        audit("swap_failed", adapter=name, reason=(str(e) or type(e).__name__).splitlines()[0][:300])
        raise
    out = dict(out, channel=f"adapter:{name}", swapped=True)
    audit("swapped", **out)
    return out


def _swap_vaulted_model(holder: Any, audit: Audit) -> dict[str, Any]:
    """`serve --vault`: swap to the model version vaultd now hands out (vaultd checked it and keeps the store)."""
    from ..engines.loader import swap_vaulted

    try:
        out = swap_vaulted(holder)
    except Exception as e:
        audit("swap_failed", model="installed", reason=(str(e) or type(e).__name__).splitlines()[0][:300])
        raise
    out = dict(out, channel="model", swapped=True)
    audit("swapped", **out)
    return out


def _auditor(app: Any, via: str) -> Audit:
    """audit(step, **detail) into serve's audit log, as kind `update` (`via`: what asked)."""

    def audit(step: str, **detail: Any) -> None:
        app.state.trust.log.append("update", user="admin", route=f"update {step}", detail=dict(detail, via=via))

    return audit


_VAULT = "this server's model comes from vaultd: `update apply` in vaultd's home swaps it there, and vaultd tells this server"


def start_handoff(app: Any) -> Any:
    """Listen for `update apply` on $CODEMOAT_HOME/run/serve-PID.sock (update.handoff); None when off."""
    settings = app.state.settings
    if not settings.update.handoff:
        return None
    from ..updates.handoff import Listener

    audit = _auditor(app, "update apply")
    if settings.vault.socket:  # `update apply` runs in vaultd's home: vaultd passes its notice on (vaultd_cmd)

        def relayed(channel: str) -> None:
            if channel != "model" and f"update:{channel.split(':', 1)[-1]}" not in settings.model.adapters:
                return  # an adapter this serve does not serve (a notice never adds one)
            try:
                if channel == "model":  # vaultd took the new version in: fetch it from there
                    _swap_vaulted_model(app.state.holder, _auditor(app, "vaultd"))
                else:
                    swap_installed(app, channel, _auditor(app, "vaultd"))
            except Exception as e:  # audited by swap_installed; the old version serves on
                log.warning("swapping in %s from vaultd failed: %s", channel, (str(e) or type(e).__name__).splitlines()[0])

        app.state.holder.on_update = relayed
    try:
        stall = app.state.settings.update.swap_stall_s
        return Listener(lambda channel: swap_installed(app, channel, audit), stall_s=stall).start()
    except OSError as e:
        log.warning("cannot listen for `update apply` (%s): installed updates serve from the next start", e)
        return None
