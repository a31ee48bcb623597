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
import time
from typing import Any

from ..keeper import Keeper, first_line

log = logging.getLogger("codemoat.audit")

EVERY_S = 0.5  # under `known_writable`'s one second, so the state never goes stale while active
ACTIVE_S = 300.0  # keep probing this long after the last request


class WritableKeeper(Keeper):
    """One daemon thread per audit log, started by the first request (`touch`) and ended by idleness or `stop`."""

    def __init__(self, audit_log: Any):
        super().__init__(audit_log, "audit-probe", EVERY_S)
        self._touched = 0.0

    def touch(self) -> None:
        """A request came: keep the state known for the next `ACTIVE_S` (cheap: no I/O, a thread at most once)."""
        self._touched = time.monotonic()
        self.start()

    def pending(self) -> bool:
        return time.monotonic() - self._touched <= ACTIVE_S

    def round(self, lg: Any, work: Any) -> None:
        lg.check_writable(max_age=EVERY_S)

    def failed(self, error: Exception) -> None:  # check_writable names its own failures
        log.warning("audit log probe failed: %s", first_line(error))
