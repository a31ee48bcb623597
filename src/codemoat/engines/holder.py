"""The model the server is serving right now, which a license lease can take away and give back.

The server asks `holder.get()` on every request; when no model is loaded it raises
`Unavailable` with the reason (lease expired, license revoked, loading), which each protocol
renders in its own error shape. `unload()` closes the engine, which zeroes its plaintext.

What the holder tells `/health` and the metrics is a typed `ModelStatus`; the license's secrets
(content key, watermark key) are not fields of it, so no status report can carry them. The
watermark key the server needs lives in `holder.watermark_key`, the content key in the loader.
Incidents (an engine crash) go to `holder.incidents`, callbacks that the server wires to its
audit log.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import Unavailable
from .base import Engine

log = logging.getLogger("codemoat.engines")


@dataclass
class LicenseStatus:
    """A sealed model's license as `/health` shows it (field names are the JSON's)."""

    license_id: str
    customer: str
    license_mode: str
    license_expires: str
    license_expires_at: float
    features: list[str]
    machine_id: str
    model_file_id: str
    format: str
    non_dumpable: bool
    sealed: bool = True
    seconds_until_expiry: float | None = None
    lease_state: str | None = None
    lease_seconds_left: float | None = None
    lease_renewals: int | None = None
    lease_last_error: str | None = None
    lease_renewed_at: float | None = None  # wall time of the last lease the key server granted
    lease_next_renewal_in: float | None = None  # seconds until the next attempt (negative: overdue)
    lease_failures: int | None = None  # failed attempts since the last renewal
    lease_key_server: str | None = None  # host:port
    lease_grace: float | None = None  # seconds the model stays loaded after the lease expires unrenewed
    seats: int | None = None
    seats_used: int | None = None


@dataclass
class InstalledBundle:
    """The update bundle the served model was installed from (`model.path = "update:model"`)."""

    version: str
    bundle_id: str
    released_at: str
    installed_at: str


@dataclass
class ModelStatus:
    """Facts about the served model for `/health` and metrics; holds no secret by construction."""

    model_id: str
    #: other names the API accepts for the model (a sealed file's stem)
    aliases: list[str] = field(default_factory=list)
    path: str | None = None
    size: int = 0
    license: LicenseStatus | None = None
    #: the installed update bundle it comes from (None: a model file named by path)
    bundle: InstalledBundle | None = None
    #: destinations the server may reach for this model (the key server of a leased license)
    egress_allow: list[str] = field(default_factory=list)


class ModelHolder:
    def __init__(self, model_id: str, loader: Callable[[], Engine] | None = None, *, aliases: list[str] | None = None):
        self.model_id = model_id
        self._loader = loader
        self._engine: Engine | None = None
        self._lock = threading.RLock()
        self._state = "unloaded"
        self.reason = "model not loaded"
        self.status = ModelStatus(model_id, aliases=[a for a in aliases or [] if a != model_id])
        #: the license's watermark key (None: outputs are not watermarked); a secret, never in `status`
        self.watermark_key: bytes | None = None
        #: the serving event loop (anyio's token, set by the app): a swapped-in engine is health-checked on it,
        #: since vLLM's stays bound to the loop of its first request
        self.loop_token: Any = None
        #: called with (kind, detail) when the engine reports an incident, e.g. ("engine_crashed", {...})
        self.incidents: list[Callable[[str, dict[str, Any]], None]] = []
        #: swapped-out engines still finishing their in-flight requests
        self.retiring: set[Engine] = set()
        #: the status `codemoat serve` exits with once stopped, set by an incident that stops the server (an
        #: inline engine's stall: `engines.watchdog.exit_server`); None: 0
        self.exit_status: int | None = None

    @property
    def features(self) -> list[str] | None:
        """What the license allows (complete, chat, index); None for a plaintext model (everything)."""
        return self.status.license.features if self.status.license else None

    @property
    def state(self) -> str:
        """One of loaded, loading, unloaded, or the engine's own state when it is not ready (restarting)."""
        eng = self._engine
        if eng is not None and self._state == "loaded":
            s = eng.state
            return "loaded" if s == "ready" else s
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value

    @property
    def ready(self) -> bool:
        """A model is loaded and its engine can take requests now."""
        return self.state == "loaded"

    def get(self) -> Engine:
        eng = self._engine
        if eng is None:
            raise Unavailable(f"model {self.model_id!r} is not available: {self.reason}")
        return eng

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    @property
    def stall(self) -> str | None:
        """Why the engine stalled (an inline engine's watchdog), or None."""
        return getattr(self._engine, "stalled", None)

    def report(self, kind: str, detail: dict[str, Any]) -> None:
        """Hand an incident to every listener; a failing listener is logged, never raised into the engine."""
        if detail.get("exit_status") is not None:
            self.exit_status = detail["exit_status"]
        for listener in list(self.incidents):
            try:
                listener(kind, {"model": self.model_id, **detail})
            except Exception:
                log.exception("could not record %s", kind)

    def set(self, engine: Engine) -> None:
        engine.on_incident = self.report
        _track(engine)
        with self._lock:
            old, self._engine = self._engine, engine
            self.state, self.reason = "loaded", ""
        if old is not None and old is not engine:
            _close(old)

    def swap(
        self,
        new: Engine,
        check: Callable[[Engine], Any] | None = None,
        *,
        settle_s: float = 1.0,
        drain_s: float = 600.0,
        after_close: Callable[[Engine], Any] | None = None,
    ) -> Engine | None:
        """Serve `new` from now on without dropping a request (an applied update bundle).

        `check(new)` runs first (a fixed prompt must produce tokens); if it raises, `new` is closed
        and the current engine keeps serving (the error goes to the caller). Then new requests get
        `new`, while the old engine finishes the streams it has in flight and is closed afterwards
        (after `settle_s`, once none is left, at most `drain_s`), then `after_close(old)` runs (freeing
        what only the old engine used: a swapped-out adapter's memfd). Returns the old engine."""
        try:
            if check is not None:
                check(new)
        except BaseException:
            new.close()
            raise
        new.on_incident = self.report
        _track(new)
        with self._lock:
            old, self._engine = self._engine, new
            self.state, self.reason = "loaded", ""
        if old is not None and old is not new:
            self.retiring.add(old)

            def done(e: Engine) -> None:
                self.retiring.discard(e)
                if after_close is not None:
                    after_close(e)

            threading.Thread(target=_retire, args=(old, settle_s, drain_s, done), name="retire-engine", daemon=True).start()
        return old

    def load(self) -> Engine:
        """(Re)load through the loader given at construction."""
        with self._lock:
            if self._engine is not None:
                return self._engine
            if self._loader is None:
                raise Unavailable(f"model {self.model_id!r} has no loader")
            self.state = "loading"
            try:
                self.set(self._loader())
            except Exception:
                self.state = "unloaded"
                raise
            return self._engine  # type: ignore[return-value]

    def unload(self, reason: str) -> None:
        """Stop serving: close the engine (zeroing its weights) and answer 503 with `reason`."""
        with self._lock:
            old, self._engine = self._engine, None
            self.state, self.reason = "unloaded", reason
        if old is not None:
            old.closed_why = reason  # a request that took it just before gets this reason, not "engine closed"
            _close(old)

    def close(self) -> None:
        self.unload("server shutting down")


def _close(engine: Engine) -> None:
    """Close an engine the holder let go of, and unfreeze the heap: `serve.run.freeze_heap` froze what
    start-up made, this engine included, and an engine is a reference cycle (`_track`'s stream refers to
    it), which only the collector frees: frozen, its memory (in-process weights) would stay for good."""
    engine.close()
    gc.unfreeze()


def _track(engine: Engine) -> None:
    """Count the engine's streams in flight (`engine.in_flight`), so a swapped-out engine is closed only when idle."""
    if getattr(engine, "in_flight", None) is not None:
        return
    engine.in_flight = 0  # type: ignore[attr-defined]
    inner = engine.stream

    async def stream(prompt: Any, params: Any) -> Any:
        engine.in_flight += 1  # type: ignore[attr-defined]
        try:
            async for chunk in inner(prompt, params):
                yield chunk
        finally:
            engine.in_flight -= 1  # type: ignore[attr-defined]

    engine.stream = stream  # type: ignore[method-assign]


def _retire(old: Engine, settle_s: float, drain_s: float, done: Callable[[Engine], Any] | None = None) -> None:
    """Close a swapped-out engine once the requests that already hold it are done, then `done(old)`."""
    import time

    time.sleep(settle_s)  # a request that took the engine just before the swap reaches its stream
    deadline = time.monotonic() + drain_s
    while getattr(old, "in_flight", 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        _close(old)
    except Exception:
        log.exception("closing the swapped-out engine failed")
    if done is not None:
        try:
            done(old)
        except Exception:
            log.exception("cleaning up after the swapped-out engine failed")
