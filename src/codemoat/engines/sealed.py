"""Serve a sealed model: verify the .moat and .lic, decrypt into memory, keep the license alive.

    holder = open_sealed("acme.moat", "acme.lic", settings=settings)
    engine = holder.get()          # Unavailable (503) while the license does not hold

Offline licenses unload the model when they expire. Lease licenses take a lease before loading,
renew it at `settings.vault.lease_renew_fraction` of its TTL, unload (zeroing the memfd) after
expiry plus grace when renewals fail or at once when the license is revoked, and load again when
a renewal succeeds. Plaintext lives only in a sealed memfd, handed to the configured engine
(`Engine.from_buffer`, or a supervised child process that inherits the memfd); the process is made
non-dumpable first, so no core file or ptrace by an unprivileged user of the same uid can read it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from ..config import Settings, load_settings
from ..errors import CodemoatError, Unavailable
from ..vault.clock import Clock, ClockGuard, iso
from ..vault.container import SealedFile
from ..vault.crl import InstalledWatch
from ..vault.keyserver import LeaseDenied
from ..vault.lease import Lease, LeaseClient
from ..vault.leasekeeper import LeaseKeeper
from ..vault.license import License, check, start_chip
from ..vault.tpmstart import TpmStart
from ..vault.machine import MachineKey
from .base import Engine
from .child import is_dumpable, set_non_dumpable
from .factory import build_engine
from .holder import LicenseStatus, ModelHolder
from .memfd import MemfdBuffer, Prefault

log = logging.getLogger("codemoat.vault")


def decrypt_to_memfd(sealed: SealedFile, key: bytes, buf: MemfdBuffer | None = None) -> MemfdBuffer:
    """The plaintext in a sealed memfd (never a disk path), in `buf` when given (a `Prefault`'s, of the
    plaintext's size) else a new one; the caller owns the buffer."""
    buf = buf or MemfdBuffer(sealed.manifest.plaintext_size, name=f"codemoat-{sealed.manifest.model_id}")
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
        log.info(
            "sealed model %s: %.2f GiB decrypted and authenticated in %.2f s into %s pages (shmem_enabled=%s)",
            sealed.manifest.model_id,
            buf.size / (1 << 30),
            seconds,
            "2 MiB" if buf.hugepages else "4 KiB",
            buf.policy,
        )
        if not buf.hugepages and buf.size >= 256 << 20:
            log.info("allowing shmem huge pages makes this load several times faster: see docs/operations.md")
        buf.seal()
        # Every chunk authenticated under the signed header, which holds the plaintext's digest: that
        # is this plaintext's digest, without hashing it (an adapter's base check needs it).
        buf.sha256 = sealed.manifest.plaintext_sha256
        return buf
    except BaseException:
        buf.close(zero=True)
        raise


def _overlap(settings: Settings, sealed: SealedFile, build) -> str | None:
    """How to decrypt while llama.cpp loads (`vault.overlap_load`, engines.overlap), or None to decrypt
    first: only a GGUF built by the llama.cpp engine in this process, without adapters (a child process
    or vaultd gets a whole memfd). "auto" is "map" while the memfd gets 4 KiB pages (there llama.cpp's
    mapping takes part of the page allocation; with 2 MiB pages it measured slower)."""
    mode = settings.vault.overlap_load
    if mode == "auto":
        from .memfd import huge_pages_allowed

        mode = "off" if huge_pages_allowed() else "map"
    if mode == "off" or build is not build_engine or settings.model.adapters:
        return None
    from . import engine_class

    try:
        cls = engine_class(settings.model.engine)
    except CodemoatError:
        return None  # build_engine says why, in one line
    inline = settings.model.isolation != "process" or not cls.isolatable
    if cls.name == "llamacpp" and inline and sealed.manifest.format == "gguf":
        return mode
    if settings.vault.overlap_load != "auto":
        log.info("vault.overlap_load applies to a GGUF on the llama.cpp engine with model.isolation = inline: decrypting first")
    return None


def _no_lease(lic: License, clock: Clock) -> Lease:
    """A lease that already ended, for a process refused a seat at start: no key, nothing to serve."""
    ttl, grace = lic.lease["ttl"], lic.lease["grace"]
    return Lease(b"", None, ttl, grace, 0, 0, 0, clock.monotonic() - ttl - grace)


class SealedHolder(ModelHolder):
    """A `ModelHolder` whose model comes from a sealed file under a license; `close()` also stops
    the license watch and gives a leased seat back."""

    watch: LicenseWatch | None = None
    keeper: LeaseKeeper | None = None

    def close(self) -> None:
        if self.watch is not None:
            self.watch.stop(release=True)
        elif self.keeper is not None:
            self.keeper.stop(release=True)
        self.watch = self.keeper = None
        super().close()


def adopt(holder: ModelHolder, fresh: SealedHolder) -> None:
    """After `holder.swap` took `fresh`'s engine: `holder` serves on under `fresh`'s license. Its
    watch and lease now unload and reload `holder` (with `fresh`'s loader); `holder`'s own watch
    stops and its lease is given back. A leased model replaces only a sealed one (whose `close`
    gives the seat back at shutdown)."""
    if fresh.keeper is not None and not isinstance(holder, SealedHolder):
        raise CodemoatError("a lease-licensed model replaces a sealed model only: restart the server to serve it")
    old_watch, old_keeper = getattr(holder, "watch", None), getattr(holder, "keeper", None)
    holder._loader, holder.watermark_key = fresh._loader, fresh.watermark_key
    fresh.serving[0] = holder
    holder.serving = fresh.serving  # type: ignore[attr-defined]
    holder.watch, holder.keeper = fresh.watch, fresh.keeper  # type: ignore[attr-defined]
    fresh.watch = fresh.keeper = None
    if holder.watch is not None:
        holder.watch.holder = holder
    if old_watch is not None:
        old_watch.stop(release=True)
    elif old_keeper is not None:
        old_keeper.stop(release=True)


class LicenseWatch:
    """One daemon thread: renews the lease (or watches the offline expiry) and refreshes `holder.status.license`."""

    def __init__(self, holder: ModelHolder, lic: License, clock: Clock, keeper: LeaseKeeper | None, machine_id: str = ""):
        self.holder, self.lic, self.clock, self.keeper = holder, lic, clock, keeper
        self.crl = InstalledWatch(lic.body, machine_id)  # a CRL installed while serving stops it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="codemoat-license", daemon=True)

    def start(self) -> LicenseWatch:
        self.refresh()
        self._thread.start()
        return self

    def step(self) -> None:
        if self.keeper is not None:
            self.keeper.tick()
        elif self.holder.loaded and self.clock.time() >= self.lic.expires:
            self.holder.unload(f"license {self.lic.id} expired on {iso(self.lic.expires)}")
        revoked = self.crl.revoked()
        if revoked is not None and self.holder.loaded:
            self.holder.unload(revoked)
        self.refresh()

    def refresh(self) -> None:
        st = self.holder.status.license
        if st is None:
            return
        st.seconds_until_expiry = round(self.lic.expires - self.clock.time(), 1)
        if self.keeper is not None:
            k = self.keeper.describe()
            st.lease_state, st.lease_seconds_left, st.lease_renewals = k["state"], k["seconds_left"], k["renewals"]
            st.lease_last_error, st.seats, st.seats_used = k["last_error"], k["seats"], k["seats_used"]
            st.lease_renewed_at, st.lease_next_renewal_in = k["renewed_at"], k["next_renewal_in"]
            st.lease_failures, st.lease_key_server, st.lease_grace = k["failures"], k["key_server"], k["grace"]
        else:
            st.lease_state = "offline"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as e:  # never let the watch die: the next step retries
                if self.holder.status.license is not None:
                    self.holder.status.license.lease_last_error = f"{type(e).__name__}: {e}"
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
    aliases: list[str] | None = None,
    clock: Clock | None = None,
    machine: MachineKey | None = None,
    watch: bool = True,
    build=build_engine,
) -> SealedHolder:
    """Verify `license_path` for `model_path` on this machine, load the model with the configured
    engine (`model.engine`), and keep the license alive. Served as `model_id`, else the manifest's
    model id up to its first dot (as the plaintext copy would be: a sealed `x.hf` folder is `x`, its full
    id an alias); `aliases` are other names the API accepts. `build(settings, memfd, model_id, parts)`
    makes what the holder serves (the vault daemon keeps the memfd itself).

    Raises `VaultError` (one line) for every refusal; nothing is loaded then."""
    settings = settings or load_settings()
    set_non_dumpable()
    clock = clock or Clock()
    machine = machine or MachineKey.load()
    sealed = SealedFile(model_path)
    lic = License.load(license_path)
    # A TPM's part of the check (vault.tpmstart) starts now, and the memfd's pages are allocated while the key is
    # unwrapped or leased (memfd.Prefault): the chip's round trips then hide behind work every start does
    # (bench/results/attest.md, offline start).
    chip = start_chip(lic, machine)
    early = None
    try:
        if _overlap(settings, sealed, build) is None:
            early = Prefault(sealed.manifest.plaintext_size, name=f"codemoat-{sealed.manifest.model_id}")
        return _open(sealed, lic, settings, model_id, aliases, clock, machine, watch, build, early, chip)
    except BaseException:
        if chip is not None:
            chip.close()  # a refusal before or in the check (a granted start's Grant holds it until it settles)
        raise
    finally:
        if early is not None:
            early.close()  # unused: a refusal, no seat, or a loader that did not decrypt (nothing once taken)


def _open(
    sealed: SealedFile,
    lic: License,
    settings: Settings,
    model_id: str | None,
    aliases: list[str] | None,
    clock: Clock,
    machine: MachineKey,
    watch: bool,
    build,
    early: Prefault | None,
    chip: TpmStart | None,
) -> SealedHolder:
    """`open_sealed` once the sealed file and license are open (and its memfd being allocated, the chip's part
    of the check started)."""
    guard = ClockGuard(machine, clock, settings.vault.clock_tolerance_s)
    # A TPM's last unwrap (the watermark key) finishes while the model is decrypted: `grant.settle()` below.
    grant = check(lic, sealed, machine, guard, defer_watermark=True, chip=chip)
    try:
        holder = _serve(sealed, lic, grant, settings, model_id, aliases, clock, machine, watch, build, early)
    except BaseException:
        grant.close()
        raise
    return holder


def _serve(sealed, lic, grant, settings, model_id, aliases, clock, machine, watch, build, early) -> SealedHolder:
    """`_open` once the license holds: take a lease (a lease license), load, start the watch."""
    if not model_id:  # served as the same model in plaintext is (loader: its name up to the first dot): a
        # sealed HF folder's manifest says `codemoat-tiny.hf`, its plaintext folder serves as `codemoat-tiny`
        model_id = sealed.manifest.model_id.split(".")[0] or sealed.manifest.model_id
        aliases = [*(aliases or []), sealed.manifest.model_id]  # the manifest's own name is accepted too
    parts = {p["name"]: (p["offset"], p["size"]) for p in sealed.manifest.parts}
    content_key: list[bytes | None] = [grant.content_key]  # the loader's, never the holder's status
    client = lease = None
    watermark = grant.watermark_key
    no_seat = None
    if lic.mode == "lease":
        client = LeaseClient(lic, machine, clock=clock, timeout=settings.vault.keyserver_timeout_s)
        try:
            lease = client.bounded(client.acquire)  # a tarpit must not hold the start: Unreachable, one line
            content_key[0], watermark = lease.content_key, lease.watermark_key
        except LeaseDenied as e:
            if e.code not in ("seats_exhausted", "machine_seats_exhausted"):
                client.close()
                raise
            # One replica too many: serve 503 with the reason, and ask again at every renewal.
            no_seat = f"no license seat: {e}"
            lease = _no_lease(lic, clock)
            log.warning("%s; this replica answers 503 until a seat frees", no_seat)
        except BaseException:
            client.close()
            raise

    def loader() -> Engine:
        key = content_key[0]
        if key is None:
            raise Unavailable(f"model {model_id!r} is not available: no valid lease")
        if clock.time() >= lic.expires:  # a reload (an adapter swap) after expiry decrypts nothing
            raise Unavailable(f"model {model_id!r} is not available: license {lic.id} expired on {iso(lic.expires)}")
        mode = _overlap(settings, sealed, build)
        if mode is not None:
            from .overlap import FillingBuffer

            return build(settings, FillingBuffer(sealed, key, mode=mode), model_id, parts)
        return build(settings, decrypt_to_memfd(sealed, key, early.take() if early else None), model_id, parts)

    holder = SealedHolder(model_id, loader, aliases=aliases)
    serving = holder.serving = [holder]  # what the lease unloads and reloads: another holder after `adopt`
    holder.watermark_key = watermark
    holder.status.size = sealed.manifest.plaintext_size
    holder.status.egress_allow = [client.destination] if client else []
    holder.status.license = LicenseStatus(
        license_id=lic.id,
        customer=lic.customer,
        license_mode=lic.mode,
        license_expires=iso(lic.expires),
        license_expires_at=lic.expires,
        features=list(lic.features),
        machine_id=machine.id,
        model_file_id=sealed.manifest.file_id,
        format=sealed.manifest.format,
        non_dumpable=not is_dumpable(),
    )
    keeper = None
    if client is not None and lease is not None:

        def lost(reason: str) -> None:
            content_key[0] = None
            serving[0].unload(reason)

        def regained(new: Lease) -> None:
            target = serving[0]
            content_key[0], target.watermark_key = new.content_key, new.watermark_key
            try:
                target.load()
            except CodemoatError as e:
                target.reason = str(e)

        keeper = LeaseKeeper(
            client, lease, on_lost=lost, on_regained=regained, clock=clock, renew_fraction=settings.vault.lease_renew_fraction
        )
    if no_seat is not None:
        assert keeper is not None
        keeper.state, keeper.last_error = "lost", no_seat
        keeper.next_attempt = clock.monotonic() + keeper.retry_interval()
        holder.reason = no_seat
        holder.keeper = keeper
        holder.watch = LicenseWatch(holder, lic, clock, keeper, machine.id).start() if watch else None
        return holder
    try:
        holder.load()
        if lic.mode == "offline":
            holder.watermark_key = grant.settle()  # a TPM's refusal of it unloads and raises
    except BaseException:
        if keeper is not None:
            keeper.stop(release=True)
        holder.close()
        raise
    holder.keeper = keeper
    holder.watch = LicenseWatch(holder, lic, clock, keeper, machine.id).start() if watch else None
    return holder
