"""A daemon thread that keeps something fresh while requests keep coming: started by a request's `touch`, one
round every `every_s`, ended by idleness (the next touch starts another), by `stop`, or when its owner is gone
(it holds only a weak reference, as `audit.timer.HeadTimer` does). `audit.probe.WritableKeeper` and
`accounts.fresh.TokenKeeper` are two such; each says what a round does and when it is idle."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
import weakref
from typing import Any


class Keeper(ABC):
    """Subclasses give `pending()` (under the keeper's lock: what the next round works on, or None when idle),
    `round(owner, work)` and `failed(error)` (a round's exception: the thread goes on)."""

    def __init__(self, owner: Any, name: str, every_s: float):
        self._ref = weakref.ref(owner)
        self._name = name
        self._every_s = every_s
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        """The thread, if none runs (cheap: no I/O, a thread at most once)."""
        if self._thread is None and not self._stop.is_set():
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @abstractmethod
    def pending(self) -> Any: ...

    @abstractmethod
    def round(self, owner: Any, work: Any) -> None: ...

    @abstractmethod
    def failed(self, error: Exception) -> None: ...

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            with self._lock:
                work = self.pending()
                if not work:
                    self._thread = None  # idle: the next touch starts another
                    return
            owner = self._ref()
            if owner is None:
                return
            try:
                self.round(owner, work)
            except Exception as e:  # noqa: BLE001 - `failed` says what went wrong; it must not end the thread
                self.failed(e)
            del owner  # no strong reference while waiting


def first_line(e: BaseException) -> str:
    """An exception for one log line: its message's first line (no SQL, no parameters), or its type's name."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__
