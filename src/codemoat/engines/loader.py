"""Turn `settings.model` into a `ModelHolder`: a GGUF path, a safetensors folder, or a sealed .moat."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import CodemoatError
from .factory import build_engine
from .holder import InstalledBundle, ModelHolder

_SWAPPING = threading.Lock()  # held while a swap loads and checks its engine


class SwapBusy(CodemoatError):
    """Another swap is loading its engine: nothing was tried (so nothing to roll back)."""

    status = 409
    code = "conflict"


def open_model(settings: Settings) -> ModelHolder:
    """Load the configured model (verifying its license when sealed) and return its holder."""
    m = settings.model
    if settings.vault.socket:
        return open_vaulted(settings)
    if not m.path:
        raise CodemoatError("no model given: pass --model PATH or set model.path in the config")
    if m.path == INSTALLED:
        return open_installed(settings)
    return _open_file(settings, Path(m.path).expanduser(), Path(m.license).expanduser() if m.license else None)


def _open_file(settings: Settings, path: Path, license: Path | None, bundle: InstalledBundle | None = None) -> ModelHolder:
    m = settings.model
    if not path.exists():
        raise CodemoatError(f"model not found: {path}")
    stem = path.name.split(".")[0]
    if path.suffix == ".moat":
        if license is None:
            raise CodemoatError(f"{path.name} is sealed: pass --license FILE.lic")
        from .sealed import open_sealed

        # served under the manifest's model id (or model.id); the file's stem is accepted too
        sealed = open_sealed(path, license, settings=settings, model_id=m.id, aliases=[stem])
        sealed.status.bundle = bundle
        return sealed
    model_id = m.id or stem
    holder = ModelHolder(model_id, loader=lambda: build_engine(settings, path, model_id))
    holder.status.path, holder.status.size = str(path), path.stat().st_size if path.is_file() else 0
    holder.load()
    return holder


#: `model.path` that serves the model bundle `codemoat update apply` installed (its current version)
INSTALLED = "update:model"


def open_installed(settings: Settings) -> ModelHolder:
    """`model.path = update:model`: the update store's current model version, with its own license.

    A version still pending (installed, but no serve has health-checked it: applied while none ran, or
    its swap was cut off) that fails to load is recorded failed, the version before it becomes current
    (updates.store.fail) and is opened instead; the health check of a pending version that loads runs
    once serve's event loop runs, before any request (serve.swapping.check_installed_at_start). Each
    start counts its try of a pending version before loading it (store.start_attempt): one tried
    `update.start_attempts` times that never came up (the process was killed loading or checking it)
    is failed without being loaded. What was recorded here is audited there (`holder.update_records`).

    Serves started together on one pending version each load it: when another serve's check passed it
    (confirmed) before this one's load failed (its own memory, its device), the store keeps it for the fleet
    (store.fail with only_pending, as at the check) and this serve opens the newest version kept before it
    that loads, for itself only (the store unchanged), until it restarts. A kept version that does not open here
    either, its folder broken (a file missing, unreadable, another version's) or its load failing, is skipped for
    the one kept before it; the log line that reports the fallback names those skipped and why, and with none
    left the start stops with one line naming each (`_to_open`). Until 2026-12-07 a kept version's broken folder
    stopped the start at once (its files were read before, outside, the try that skips a failed load), though a
    version kept before it would have served."""
    import logging

    from ..updates.store import KEEP, UpdateStore, hold, model_files

    if settings.model.license:
        installed_model(settings.model.license)  # says why: update:model brings its own license
    log = logging.getLogger("codemoat.updates")
    records: list[tuple[str, dict]] = []
    store = UpdateStore(audit=lambda step, d: records.append((step, d)))
    failed: set[str] = set()  # versions that failed to load here
    skipped: list[str] = []  # "VERSION (why)" of each kept version this serve tried for itself and could not open

    def skip(bundle: InstalledBundle, e: Exception) -> None:
        """A kept version this serve tried for itself (not the store's current) does not open here: the next."""
        if isinstance(e, OSError) and e.filename and e.strerror:  # a file of its folder: named, not its whole path
            reason = f"its {Path(e.filename).name}: {e.strerror}"
        else:
            reason = (str(e) or type(e).__name__).splitlines()[0][:300]
        failed.add(bundle.bundle_id)
        skipped.append(f"{bundle.version} ({reason})")
        records.append(
            ("swap_failed", {"model": "installed", "version": bundle.version, "reason": reason, "this_server_only": True})
        )
        log.warning("installed model %s, kept before the current one, failed to load here too: %s", bundle.version, reason)

    for _ in range(2 * KEEP + 2):  # the current version, then each one kept before it
        for gone in store.start_attempt("model", settings.update.start_attempts):
            log.warning("installed model %s: %s; going back to the version before it", gone["version"], gone["reason"])
            if store.current("model") is None:
                raise CodemoatError(f"installed model {gone['version']}: {gone['reason']}; no version before it is installed")
        cur = _to_open(store, failed, skipped)
        own = cur["bundle_id"] != (store.current("model") or {}).get("bundle_id")  # this serve's choice, not the store's
        bundle = installed_bundle(cur)
        # a broken folder (a file missing, unreadable, another version's) fails as a failed load does: a kept
        # version's is skipped for the one kept before it, a pending current one goes back at once (until
        # 2026-12-07 both stopped the start, the pending one at every start until start_attempts ran out)
        try:
            path, license = model_files(Path(cur["dir"]))
            hold("start")  # tests only: a serve killed here, its try of a pending version counted
            holder = _open_file(settings, path, license, bundle)
        except Exception as e:
            if own:  # not the store's version: nothing to record in it
                skip(bundle, e)
                continue
            reason = (str(e) or type(e).__name__).splitlines()[0][:300]
            if not store.pending("model", bundle.bundle_id):
                raise
            log.warning(
                "installed model %s was never checked and failed to load: %s; going back to the version before it",
                bundle.version,
                reason,
            )
            records.append(("swap_failed", {"model": "installed", "version": bundle.version, "reason": reason}))
            failed.add(bundle.bundle_id)
            hold("start_load")  # tests only: another serve confirms it here, as one loading it beside this one would
            store.fail("model", bundle.bundle_id, f"it failed to load at serve start: {reason}", only_pending=True)
            if store.current("model") is None:
                raise CodemoatError(
                    f"installed model {bundle.version} failed to load: {reason}; no version before it is installed"
                ) from None
            continue
        if own:
            records.append(
                ("swapped", {"model": "installed", "channel": "model", "version": bundle.version, "this_server_only": True})
            )
            log.warning(
                "installed model %s: another server's check passed it, so the store keeps it; it failed to load here, "
                "and this server serves %s, kept before it, until it restarts%s",
                store.current("model")["version"],
                bundle.version,
                f"; skipped, kept between them, failing here too: {'; '.join(skipped)}" if skipped else "",
            )
        holder.update_records = records
        return holder
    raise CodemoatError("no installed model version could be loaded (`codemoat update list`)")


def _to_open(store: Any, failed: set[str], skipped: list[str]) -> dict:
    """The store's current model version, unless it failed to load here: then the newest kept before it that
    has not (one another serve's check passed stays current for the fleet: `open_installed`). With none left,
    one line naming the kept versions tried (`skipped`: "VERSION (why)") and why each did not open."""
    s = store.state()
    ch = s["channels"].get("model") or {}
    for bid in [ch.get("current"), *reversed(ch.get("history", []))]:
        if bid and bid not in failed:
            return dict(s["bundles"][bid], bundle_id=bid)
    if ch.get("current") is None:
        raise CodemoatError(f"model.path is {INSTALLED!r}, but no model bundle is installed (`codemoat update apply FILE`)")
    version = s["bundles"][ch["current"]]["version"]
    tried = f": {'; '.join(skipped)}" if skipped else ""
    raise CodemoatError(
        f"installed model {version} failed to load here (another server's check passed it, so the store keeps it) "
        f"and no version kept before it loaded here{tried}"
    )


def installed_model(license: str | None, store: Any = None) -> tuple[Path, Path, InstalledBundle]:
    """The current model bundle's sealed model, its own license and what /health says of it (updates.store)."""
    from ..updates.store import UpdateStore

    if license:
        raise CodemoatError(f"model.path = {INSTALLED!r} serves the installed model with its own license: leave out --license")
    cur = (store or UpdateStore()).current("model")
    if cur is None:
        raise CodemoatError(f"model.path is {INSTALLED!r}, but no model bundle is installed (`codemoat update apply FILE`)")
    from ..updates.store import model_files

    return (*model_files(Path(cur["dir"])), installed_bundle(cur))


def installed_bundle(cur: dict) -> InstalledBundle:
    """/health's facts of an installed model bundle (`UpdateStore.current("model")`)."""
    from ..vault.clock import iso

    return InstalledBundle(cur["version"], cur["bundle_id"], iso(cur["released_at"]), iso(cur["installed_at"]))


class VaultedHolder(ModelHolder):
    """A `ModelHolder` whose model comes from vaultd; `close()` also hangs up on vaultd, which frees the
    connection (and the thread) it holds there for this process (one uid may hold 32)."""

    client: Any = None

    def close(self) -> None:
        super().close()
        if self.client is not None:
            self.client.close()
            self.client = None


def open_vaulted(settings: Settings) -> ModelHolder:
    """`serve --vault unix:PATH --model ID`: the model comes from the vault daemon as a sealed memfd.

    This process never opens the machine key, the license or the container. The daemon's facts
    (license, features) fill `/health`; a `revoke` on the kept connection unloads the model (503
    with the daemon's reason), an `available` loads it again. When the daemon goes away the model
    already held keeps serving; nothing can be fetched again until it is back."""
    import logging
    import threading

    from ..vault.client import VaultClient, VaultdError
    from .child import set_non_dumpable
    from .memfd import MemfdBuffer

    model_id = settings.model.id or settings.model.path
    if not model_id:
        raise CodemoatError("serve --vault needs --model MODEL_ID (the model id `codemoat inspect` shows)")
    set_non_dumpable()
    client = VaultClient.connect(settings.vault.socket)
    first = [client.fetch(model_id)]
    from .adapters import set_vendor_source

    set_vendor_source(client.fetch)  # vendor adapters (update:NAME) come from vaultd too: this process cannot open them

    def loader():
        got = first.pop() if first else client.fetch(model_id)
        holder.watermark_key = got.watermark_key  # the customer's, from vaultd: completions stay traceable
        try:
            buf = MemfdBuffer.adopt(got.fd, got.size)
        except ValueError as e:
            raise VaultdError(f"the vault daemon sent {e}") from None
        parts = {k: tuple(v) for k, v in (got.facts.get("parts") or {}).items()}
        sha = got.facts.get("sha256")  # vaultd authenticated what it sends: its header's digest is this memfd's
        buf.sha256 = sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) else None
        holder.fetched = got.facts, got.size  # the status of the engine built here, once it serves
        return build_engine(settings, buf, model_id, parts)

    holder = VaultedHolder(model_id, loader)
    holder.client = client
    holder.on_update = None
    first_facts = first[0].facts
    vault_status(holder, first_facts, first[0].size)
    try:
        holder.load()
    except BaseException:
        client.close()
        raise

    def on_message(msg: dict) -> None:
        if msg.get("op") == "update" and isinstance(msg.get("channel"), str):
            if msg.get("model", model_id) != model_id:  # another model vaultd holds was updated
                return
            hook = holder.on_update  # set by serve (serve.swapping): swap in what vaultd's `update apply` installed
            if hook is not None:  # not on this thread: the swap fetches from vaultd, whose answers it reads
                threading.Thread(target=hook, args=(msg["channel"],), name="vault-update", daemon=True).start()
            return
        if msg.get("model") != model_id:
            return
        if msg.get("op") == "revoke":
            holder.unload(str(msg.get("reason") or "withdrawn by the vault daemon"))
        elif msg.get("op") == "available" and not holder.loaded:
            try:
                holder.load()
                vault_status(holder, *holder.fetched)  # vaultd may hand another version (or license) now
            except CodemoatError as e:
                holder.reason = str(e)

    rules = first_facts.get("lease_rules") if isinstance(first_facts.get("lease_rules"), dict) else None

    def on_lost(reason: str) -> None:
        log = logging.getLogger("codemoat.vault")
        if rules is None:  # an offline license: keep what is loaded until it expires or serve restarts
            log.warning("%s; serving what is loaded, no new loads", reason)
            return
        # a leased model: nobody renews the lease now, so stop when the last renewal could run out
        wait = float(rules.get("ttl", 0)) + float(rules.get("grace", 0))
        log.warning("%s; no new loads, and the leased model stops in %.0f s (lease TTL + grace)", reason, wait)
        timer = threading.Timer(wait, holder.unload, args=(f"lost the vault daemon and its lease ({reason})",))
        timer.daemon = True
        timer.start()

    client.watch(on_message, on_lost)
    return holder


def vault_status(holder: ModelHolder, facts: dict, size: int) -> None:
    """/health's facts of a model vaultd handed over: size, license, the installed bundle it comes from."""
    import dataclasses

    from .child import is_dumpable
    from .holder import LicenseStatus

    holder.status.size = size
    lic = facts.get("license")
    if isinstance(lic, dict):
        names = {f.name for f in dataclasses.fields(LicenseStatus)}
        holder.status.license = LicenseStatus(**{k: v for k, v in lic.items() if k in names})
        holder.status.license.non_dumpable = not is_dumpable()
    b = facts.get("bundle")
    names = {f.name for f in dataclasses.fields(InstalledBundle)}
    ok = isinstance(b, dict) and set(b) >= names and all(isinstance(b[k], str) for k in names)
    holder.status.bundle = InstalledBundle(**{k: b[k] for k in names}) if ok else None


PROBE_PROMPT = "def add(a, b):\n    return"


def probe(engine, adapter: str | None = None, *, loop: object = None) -> None:
    """The health check of a freshly loaded engine: a fixed prompt must produce tokens (with `adapter` when given).

    It runs on the serving event loop `loop` (an anyio token) when given: vLLM's engine binds its output
    handler to the loop of its first request, so one checked on a loop of its own would hang once served."""
    import asyncio

    from .base import SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0, top_k=1, repeat_penalty=1.0, stop=[], seed=0)
    params.adapter = adapter
    if loop is not None:
        import anyio.from_thread

        done = anyio.from_thread.run(engine.complete, PROBE_PROMPT, params, token=loop)
    else:
        done = asyncio.run(engine.complete(PROBE_PROMPT, params))
    if done.completion_tokens < 1:
        what = f"adapter {adapter!r}" if adapter else "model"
        raise CodemoatError(f"the new {what} produced no tokens for the health-check prompt")


def _one_swap_at_a_time(fn):
    """Swaps run one at a time: each edits `model.adapters` and loads a second engine; two at once
    could leave a failed adapter in the list the next reload serves (and hold three engines)."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kw):
        if not _SWAPPING.acquire(blocking=False):
            raise SwapBusy("another model or adapter swap is in progress: try again once it has finished")
        try:
            return fn(*args, **kw)
        finally:
            _SWAPPING.release()

    return run


@_one_swap_at_a_time
def swap_adapter(holder: ModelHolder, settings: Settings, name: str) -> dict:
    """Serve the installed version of vendor adapter `name` (`update:NAME`, added to `model.adapters` when
    new) without a restart: an engine over the same base with the new adapter set is built beside the
    served one, health-checked with and without the adapter, and swapped in (`holder.swap`); in-flight
    requests finish on the old engine. On any failure the old engine serves on and the list is unchanged."""
    import time

    from .adapters import VENDOR_PREFIX

    t0 = time.monotonic()
    entry = VENDOR_PREFIX + name
    before = list(settings.model.adapters)
    if holder._loader is None:
        raise CodemoatError("this server's model cannot be reloaded, so its adapters cannot be swapped")
    settings.model.adapters = before if entry in before else [*before, entry]
    try:
        engine = holder._loader()  # the same base (a sealed one is decrypted again), the new adapter set
        served = {a.name: a for a in getattr(engine, "adapters_served", ())}
        if name not in served:
            engine.close()
            from .adapters import REFUSED

            raise CodemoatError(REFUSED.get(name) or f"adapter {name!r} was not loaded by the new engine")
        loop = holder.loop_token
        holder.swap(
            engine,
            lambda e: (probe(e, loop=loop), probe(e, name, loop=loop)),
            after_close=lambda old: _free_adapters(holder, old),
        )
    except BaseException:
        settings.model.adapters = before
        raise
    return {
        "model": holder.model_id,
        "adapter": name,
        "version": served[name].version,
        "seconds": round(time.monotonic() - t0, 3),
    }


def _free_adapters(holder: ModelHolder, old) -> None:
    """Close the memfds of adapters only the closed engine `old` served (a swapped-out version)."""
    from .adapters import release_unused

    live = [e for e in (holder._engine, *holder.retiring) if e is not None]
    release_unused(getattr(old, "adapters_served", ()), [a for e in live for a in getattr(e, "adapters_served", ())])


@_one_swap_at_a_time
def swap_vaulted(holder: ModelHolder) -> dict:
    """`serve --vault`: vaultd took in a new version of the model (`update apply` or `update rollback` in
    its home): fetch its memfd, build an engine beside the served one, health-check it and swap
    (`holder.swap`: in-flight requests finish on the old engine, whose memfd goes with it)."""
    import time

    t0 = time.monotonic()
    if holder._loader is None:
        raise CodemoatError("this server's model cannot be reloaded")
    engine = holder._loader()
    facts, size = holder.fetched
    holder.swap(engine, lambda e: probe(e, loop=holder.loop_token))
    vault_status(holder, facts, size)
    b = holder.status.bundle
    return {"model": holder.model_id, "version": b.version if b else None, "seconds": round(time.monotonic() - t0, 3)}


@_one_swap_at_a_time
def swap_model(
    holder: ModelHolder, settings: Settings, path: Path, license: Path | None, bundle: InstalledBundle | None = None
) -> dict:
    """Load `path` beside the served model, health-check it and make it the one served (`holder.swap`);
    in-flight requests finish on the old engine. On any failure the old one keeps serving. `bundle`:
    the installed update bundle `path` is (None: a model file).

    A leased model takes its lease first (opening it does: no lease, no load), so the switch happens
    only once the new license holds; from then on the new license's watch and lease govern the
    served model, and the old license's lease is given back (`sealed.adopt`)."""
    import time

    from .sealed import SealedHolder, adopt

    t0 = time.monotonic()
    s = settings.model_copy(deep=True)
    s.model.path, s.model.license = str(path), str(license) if license else None
    fresh = open_model(s)
    try:
        if isinstance(fresh, SealedHolder) and fresh.keeper is not None and not isinstance(holder, SealedHolder):
            raise CodemoatError("a lease-licensed model replaces a sealed model only: restart the server to serve it")
        engine, fresh._engine = fresh.get(), None  # detached: `holder` owns it from here
        holder.swap(engine, lambda e: probe(e, loop=holder.loop_token))
    except BaseException:
        fresh.close()  # stops its license watch and gives its lease back
        raise
    # reloads (a regained lease, an adapter swap) build with the server's own model settings, not the copy
    s.model = settings.model
    if isinstance(fresh, SealedHolder):
        adopt(holder, fresh)
    else:
        holder._loader, holder.watermark_key = fresh._loader, None
    holder.status.path, holder.status.size, holder.status.license = fresh.status.path, fresh.status.size, fresh.status.license
    holder.status.egress_allow = list(fresh.status.egress_allow)
    holder.status.bundle = bundle
    return {"model": holder.model_id, "path": str(path), "seconds": round(time.monotonic() - t0, 3)}
