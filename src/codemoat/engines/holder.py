"""The model the server is serving right now, which a license lease can take away and give back.

The server asks `holder.get()` on every request; when no model is loaded it raises
`Unavailable` with the reason (lease expired, license revoked, loading), which each protocol
renders in its own error shape. `unload()` closes the engine, which zeroes its plaintext.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..errors import Unavailable
from .base import Engine


class ModelHolder:
    def __init__(self, model_id: str, loader: Callable[[], Engine] | None = None):
        self.model_id = model_id
        self._loader = loader
        self._engine: Engine | None = None
        self._lock = threading.RLock()
        self.state = "unloaded"
        self.reason = "model not loaded"
        #: extra facts for /health and metrics (license expiry, lease state, ...)
        self.info: dict[str, Any] = {}

    def get(self) -> Engine:
        eng = self._engine
        if eng is None:
            raise Unavailable(f"model {self.model_id!r} is not available: {self.reason}")
        return eng

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def set(self, engine: Engine) -> None:
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
