"""Serve a sealed model: verify the .moat and .lic, decrypt into memory, keep the license alive.

    holder = open_sealed("acme.moat", "acme.lic", settings=settings)
    engine = holder.get()          # Unavailable (503) while the license does not hold

Offline licenses unload the model when they expire. Lease licenses take a lease before loading,
renew it at `settings.vault.lease_renew_fraction` of its TTL, unload (zeroing the memfd) after
expiry plus grace when renewals fail or at once when the license is revoked, and load again when
a renewal succeeds. Plaintext lives only in a sealed memfd (GGUF) or in process memory
(safetensors); the process is made non-dumpable first, so no core file or ptrace by an
unprivileged user of the same uid can read it.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..config import Settings, load_settings
from ..errors import CodemoatError, Unavailable
from ..vault.clock import Clock, ClockGuard, iso
from ..vault.container import SealedFile
from ..vault.lease import Lease, LeaseClient, LeaseKeeper
from ..vault.license import License, check
from ..vault.machine import MachineKey
from .base import Engine
from .holder import ModelHolder
from .memfd import MemfdBuffer

PR_SET_DUMPABLE, PR_GET_DUMPABLE = 4, 3
log = logging.getLogger("codemoat.vault")


def set_non_dumpable() -> bool:
    """prctl(PR_SET_DUMPABLE, 0): no core dumps, and /proc/PID/mem and ptrace need CAP_SYS_PTRACE."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def is_dumpable() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 1


def _gguf_engine(sealed: SealedFile, key: bytes, opts: dict[str, Any]) -> Engine:
    from .llamacpp import LlamaCppEngine

    buf = MemfdBuffer(sealed.manifest.plaintext_size, name=f"codemoat-{sealed.manifest.model_id}")
    try:
        t = time.perf_counter()
        if buf.hugepages:
            # 2 MiB pages: AES-GCM writes straight into the mapping, at about memory speed.
            sealed.decrypt_into(key, buf.view)
        else:
            # 4 KiB pages: pwrite lets the kernel allocate them without a page fault each (~40%
            # faster than decrypting through the mapping); plaintext passes through zeroed scratch
            # buffers, one per worker.
            sealed.decrypt_to(key, buf.write_at)
        seconds = time.perf_counter() - t
        log.info("sealed model %s: %.2f GiB decrypted and authenticated in %.2f s into %s pages (shmem_enabled=%s)",
                 sealed.manifest.model_id, buf.size / (1 << 30), seconds, "2 MiB" if buf.hugepages else "4 KiB",
                 buf.policy)
        if not buf.hugepages and buf.size >= 256 << 20:
            log.info("allowing shmem huge pages makes this load several times faster: see docs/operations.md")
        buf.seal()
        return LlamaCppEngine.from_memfd(buf, **opts)
    except BaseException:
        buf.close(zero=True)
        raise


def _safetensors_engine(sealed: SealedFile, key: bytes, opts: dict[str, Any]) -> Engine:
    from .transformers_engine import TransformersEngine

    plain = sealed.decrypt(key, check_sha256=False)
    try:
        parts = {p["name"]: (p["offset"], p["size"]) for p in sealed.manifest.parts}

        def part(name: str) -> bytes | None:
            if name not in parts:
                return None
            off, size = parts[name]
            return bytes(plain[off: off + size])

        wname = next(n for n in parts if n.endswith(".safetensors"))
        config = json.loads(part("config.json") or b"{}")
        tok = part("tokenizer.json")
        fn = TransformersEngine.from_bytes
        accepted = inspect.signature(fn).parameters
        kw = {k: v for k, v in opts.items() if k in accepted or any(p.kind == p.VAR_KEYWORD for p in accepted.values())}
        return fn(part(wname), config, tok.decode() if tok is not None else None, **kw)
    finally:
        plain[:] = bytes(len(plain))


class SealedHolder(ModelHolder):
    """A `ModelHolder` whose model comes from a sealed file under a license; `close()` also stops
    the license watch and gives a leased seat back."""

    watch: "LicenseWatch | None" = None
    keeper: LeaseKeeper | None = None

    def close(self) -> None:
        if self.watch is not None:
            self.watch.stop(release=True)
        elif self.keeper is not None:
            self.keeper.stop(release=True)
        self.watch = self.keeper = None
        super().close()


class LicenseWatch:
    """One daemon thread: renews the lease (or watches the offline expiry) and refreshes `holder.info`."""

    def __init__(self, holder: ModelHolder, lic: License, clock: Clock, keeper: LeaseKeeper | None):
        self.holder, self.lic, self.clock, self.keeper = holder, lic, clock, keeper
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="codemoat-license", daemon=True)

    def start(self) -> "LicenseWatch":
        self.refresh()
        self._thread.start()
        return self

    def step(self) -> None:
        if self.keeper is not None:
            self.keeper.tick()
        elif self.holder.loaded and self.clock.time() >= self.lic.expires:
            self.holder.unload(f"license {self.lic.id} expired on {iso(self.lic.expires)}")
        self.refresh()

    def refresh(self) -> None:
        info = self.holder.info
        info["seconds_until_expiry"] = round(self.lic.expires - self.clock.time(), 1)
        if self.keeper is not None:
            k = self.keeper.describe()
            info.update(lease_state=k["state"], lease_seconds_left=k["seconds_left"], lease_renewals=k["renewals"],
                        lease_last_error=k["last_error"], seats=k["seats"], seats_used=k["seats_used"])
        else:
            info["lease_state"] = "offline"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as e:  # never let the watch die: the next step retries
                self.holder.info["lease_last_error"] = f"{type(e).__name__}: {e}"
            wait = 1.0
            if self.keeper is not None:
                wait = min(wait, max(0.01, self.keeper.next_attempt - self.clock.monotonic()))
            self.clock.wait(self._stop, wait)

    def stop(self, release: bool = False) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self.keeper is not None:
            self.keeper.stop(release=release)


def open_sealed(
    model_path: str | Path,
    license_path: str | Path,
    *,
    settings: Settings | None = None,
    model_id: str | None = None,
    clock: Clock | None = None,
    machine: MachineKey | None = None,
    holder_factory: Callable[[str, Callable[[], Engine]], ModelHolder] = SealedHolder,
    engine_factory: Callable[[SealedFile, bytes, dict[str, Any]], Engine] | None = None,
    watch: bool = True,
) -> ModelHolder:
    """Verify `license_path` for `model_path` on this machine, load the model, and keep the license alive.

    Raises `VaultError` (one line) for every refusal; nothing is loaded then."""
    settings = settings or load_settings()
    set_non_dumpable()
    clock = clock or Clock()
    machine = machine or MachineKey.load()
    sealed = SealedFile(model_path)
    lic = License.load(license_path)
    guard = ClockGuard(machine, clock, settings.vault.clock_tolerance_s)
    grant = check(lic, sealed, machine, guard)
    fmt = sealed.manifest.format
    model_id = model_id or sealed.manifest.model_id
    from .loader import engine_options

    opts = engine_options(settings, model_id)
    if fmt == "safetensors":
        opts = {"model_id": model_id, "n_ctx": settings.model.n_ctx, "n_threads": settings.model.n_threads}
    build = engine_factory or (_gguf_engine if fmt == "gguf" else _safetensors_engine)
    keys: dict[str, bytes | None] = {"content": grant.content_key, "watermark": grant.watermark_key}
    client = lease = None
    if lic.mode == "lease":
        client = LeaseClient(lic, machine, clock=clock)
        try:
            lease = client.acquire()
        except BaseException:
            client.close()
            raise
        keys["content"], keys["watermark"] = lease.content_key, lease.watermark_key

    def loader() -> Engine:
        key = keys["content"]
        if key is None:
            raise Unavailable(f"model {model_id!r} is not available: no valid lease")
        return build(sealed, key, opts)

    holder = holder_factory(model_id, loader)
    holder.info.update({
        "sealed": True, "license_id": lic.id, "customer": lic.customer, "license_mode": lic.mode,
        "license_expires": iso(lic.expires), "license_expires_at": lic.expires, "features": list(lic.features),
        "machine_id": machine.id, "model_file_id": sealed.manifest.file_id, "format": fmt,
        "watermark_key": keys["watermark"], "egress_allow": [client.destination] if client else [],
        "non_dumpable": not is_dumpable(),
    })
    keeper = None
    if client is not None and lease is not None:
        def lost(reason: str) -> None:
            keys["content"] = None
            holder.unload(reason)

        def regained(new: Lease) -> None:
            keys["content"], keys["watermark"] = new.content_key, new.watermark_key
            holder.info["watermark_key"] = new.watermark_key
            try:
                holder.load()
            except CodemoatError as e:
                holder.reason = str(e)

        keeper = LeaseKeeper(client, lease, on_lost=lost, on_regained=regained, clock=clock,
                             renew_fraction=settings.vault.lease_renew_fraction)
    try:
        holder.load()
    except BaseException:
        if keeper is not None:
            keeper.stop(release=True)
        raise
    holder.keeper = keeper  # type: ignore[attr-defined]
    holder.watch = LicenseWatch(holder, lic, clock, keeper).start() if watch else None  # type: ignore[attr-defined]
    return holder
