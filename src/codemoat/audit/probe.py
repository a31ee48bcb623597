"""Keep the audit log's writability known while editors are active, so a request after a pause does not wait for it.

`serve.auditing.AuditMiddleware` refuses a request when the audit log could not take its record. It
trusts a probe or an append from the last second (`AuditLog.known_writable`); older than that, the request
first probes on a worker thread (disk space, then a write transaction that changes nothing): 1-3 ms
before the engine sees the request. An editor pauses between keystrokes for longer than a second, so its
next completion paid that probe every time (helper A's strace, session 12: 7.6 ms to the first token after
1.2 s idle, 5.6 ms after 0.2 s).

While requests keep coming (one within `ACTIVE_S`), this thread probes every `EVERY_S` instead, so the
state a request reads is as fresh as before (under a second) and the request does not wait for it. A
failed probe marks the log unavailable at once (`AuditLog.check_writable`): refusals come sooner, not
later, and the request path still probes itself whenever the state is not known. An idle server stops
probing after `ACTIVE_S`. The thread holds only a weak reference, as `audit.timer.HeadTimer` does.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

log = logging.getLogger("codemoat.audit")

EVERY_S = 0.5  # under `known_writable`'s one second, so the state never goes stale while active
ACTIVE_S = 300.0  # keep probing this long after the last request


class WritableKeeper:
    """One daemon thread per audit log, started by the first request (`touch`) and ended by idleness or `stop`."""

    def __init__(self, audit_log: Any):
        self._ref = weakref.ref(audit_log)
        self._lock = threading.Lock()
        self._touched = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def touch(self) -> None:
        """A request came: keep the state known for the next `ACTIVE_S` (cheap: no I/O, a thread at most once)."""
        self._touched = time.monotonic()
        if self._thread is None and not self._stop.is_set():
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=_run, args=(self._ref, self), name="audit-probe", daemon=True)
                    self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def _run(ref: weakref.ref, keeper: WritableKeeper) -> None:
    while not keeper._stop.wait(EVERY_S):
        with keeper._lock:
            if time.monotonic() - keeper._touched > ACTIVE_S:
                keeper._thread = None  # idle: the next request's touch starts another
                return
        lg = ref()
        if lg is None:
            return
        try:
            lg.check_writable(max_age=EVERY_S)
        except Exception as e:  # noqa: BLE001 - check_writable names its own failures; anything else must not end the thread
            log.warning("audit log probe failed: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        del lg  # no strong reference while waiting
