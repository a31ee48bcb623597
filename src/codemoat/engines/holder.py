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
    seats: int | None = None
    seats_used: int | None = None


@dataclass
class ModelStatus:
    """Facts about the served model for `/health` and metrics; holds no secret by construction."""

    model_id: str
    #: other names the API accepts for the model (a sealed file's stem)
    aliases: list[str] = field(default_factory=list)
    path: str | None = None
    size: int = 0
    license: LicenseStatus | None = None
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
        #: called with (kind, detail) when the engine reports an incident, e.g. ("engine_crashed", {...})
        self.incidents: list[Callable[[str, dict[str, Any]], None]] = []

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

    def report(self, kind: str, detail: dict[str, Any]) -> None:
        """Hand an incident to every listener; a failing listener is logged, never raised into the engine."""
        for listener in list(self.incidents):
            try:
                listener(kind, {"model": self.model_id, **detail})
            except Exception:
                log.exception("could not record %s", kind)

    def set(self, engine: Engine) -> None:
        engine.on_incident = self.report
        with self._lock:
            old, self._engine = self._engine, engine
            self.state, self.reason = "loaded", ""
        if old is not None and old is not engine:
            old.close()

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
            old.close()

    def close(self) -> None:
        self.unload("server shutting down")
