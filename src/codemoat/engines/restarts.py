"""What a supervised engine (`engines.supervised`) does when its process dies: the crash policy.

When the child dies (a signal, or any exit the server did not ask for, a hang the watchdog killed
included), every request in flight gets `Unavailable` (503 in each protocol's shape, or an in-band
error on a stream that had begun), `on_incident("engine_crashed", …)` reports it with the signal,
and the engine restarts after a backoff (`state` is "restarting" until then). `SAFE_AFTER` crashes
within `SAFE_WINDOW_S` on the same configuration restart it with the engine's `safe_options`
(llama.cpp: `use_extra_bufts=False`, the kernels that a quantised model crashed in on AMX Xeons),
said in one log line. A mixin of `SupervisedEngine`, which holds the process and its requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from ..errors import CodemoatError, Unavailable
from .base import Engine
from .inbox import Request
from .spawn import Child, Died, describe_exit

log = logging.getLogger("codemoat.engines")

SAFE_AFTER = 2  # crashes ...
SAFE_WINDOW_S = 600.0  # ... within this many seconds switch to the engine's safe options
BACKOFF_S = (0.25, 1.0, 4.0, 15.0, 30.0)  # restart delays after consecutive crashes
STABLE_S = 60.0  # a child that lived this long resets the backoff


class Restarts:
    """The crash half of `SupervisedEngine`."""

    # from `SupervisedEngine` (and `Engine`): _launch, the process, its requests and the counts /health shows
    engine_cls: type[Engine]
    name: str
    model_id: str
    opts: dict[str, Any]
    on_incident: Any
    _lock: threading.Lock
    _child: Child | None
    _requests: dict[int, Request]
    _state: str
    _closed: bool
    crashes: int
    last_exit: str | None
    last_crash_at: float | None
    safe: bool
    _recent: deque[float]
    _backoff: int

    def _ended(self, child: Child) -> None:
        code = child.proc.wait()
        with self._lock:
            if self._closed or child is not self._child:
                return  # asked to stop
            self._child, self._state = None, "restarting"
            failed, self._requests = self._requests, {}
            now = time.monotonic()
            self.crashes += 1
            self.last_exit, self.last_crash_at = "hung" if child.hung is not None else describe_exit(code), time.time()
            self._backoff = 0 if now - child.started >= STABLE_S else self._backoff + 1
            delay = BACKOFF_S[min(self._backoff, len(BACKOFF_S) - 1)]
            self._recent.append(now)
            while self._recent and now - self._recent[0] > SAFE_WINDOW_S:
                self._recent.popleft()
        if child.hung is not None:
            message = "the inference engine stopped answering and is restarting; retry in a moment"
        else:
            message = f"the inference engine crashed ({self.last_exit}) and is restarting; retry in a moment"
        for req in failed.values():
            req.deliver(Unavailable(message))
        log.error(
            "engine process %d for %s died with %s (crash %d); restarting in %.2g s",
            child.proc.pid,
            self.model_id,
            self.last_exit,
            self.crashes,
            delay,
        )
        if not self.safe and self.engine_cls.safe_options and len(self._recent) >= SAFE_AFTER:
            self._go_safe(f"the {self.name} engine crashed {len(self._recent)} times in {SAFE_WINDOW_S:.0f} s")
        if self.on_incident is not None:
            self.on_incident(
                "engine_crashed",
                {
                    "signal": describe_exit(code) if code < 0 else None,
                    "exit_code": code,
                    "crashes": self.crashes,
                    "restart_in_s": delay,
                    "safe_options": self.safe,
                    "pid": child.proc.pid,
                    "hung": child.hung is not None,  # it stopped reading or answering: killed by the server
                    "why": child.hung,  # which: no frame taken, no answer and no work, or no step while it ran
                },
            )
        threading.Thread(target=self._restart, args=(delay,), name="engine-restart", daemon=True).start()

    def _go_safe(self, why: str) -> None:
        self.safe = True
        self.opts.update(self.engine_cls.safe_options)
        log.warning("%s: restarting it with %s", why, ", ".join(f"{k}={v}" for k, v in self.engine_cls.safe_options.items()))

    def _restart(self, delay: float) -> None:
        while True:
            time.sleep(delay)
            if self._closed:
                return
            try:
                self._launch(restart=True)
                return
            except (CodemoatError, Died, OSError) as e:
                self.crashes += 1
                self.last_exit, self.last_crash_at = str(e), time.time()
                self._backoff += 1
                delay = BACKOFF_S[min(self._backoff, len(BACKOFF_S) - 1)]
                log.error("engine for %s did not start again (%s); next try in %.2g s", self.model_id, e, delay)
                if isinstance(e, Died):  # died while loading: a crash like any other
                    self._recent.append(time.monotonic())
                    if not self.safe and self.engine_cls.safe_options and len(self._recent) >= SAFE_AFTER:
                        self._go_safe(f"the {self.name} engine crashed {len(self._recent)} times in {SAFE_WINDOW_S:.0f} s")
                    if self.on_incident is not None:
                        self.on_incident(
                            "engine_crashed",
                            {
                                "signal": str(e) if e.code < 0 else None,
                                "exit_code": e.code,
                                "crashes": self.crashes,
                                "restart_in_s": delay,
                                "safe_options": self.safe,
                                "while": "loading",
                            },
                        )
