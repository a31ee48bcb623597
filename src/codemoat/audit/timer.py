"""The time bound on the audit chain's unsigned tail: sign `sign_interval_ms` after a record was left unsigned.

An appender signs when `sign_every` records have gone by (`audit.log`); a quiet replica would leave
its last records unsigned until the next append. This thread signs them when the interval has
passed, and at interpreter exit (a CLI command that appended one record and returns). It holds
only a weak reference, so an `AuditLog` nobody uses any more is collected, thread and all.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import Any

from ..keeper import first_line

log = logging.getLogger("codemoat.audit")


class HeadTimer:
    """One daemon thread per audit log, started on the first record left unsigned."""

    def __init__(self, audit_log: Any):
        self._ref = weakref.ref(audit_log)
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def arm(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=_run, args=(self._ref, self), name="audit-head-signer", daemon=True)
            self._thread.start()
            atexit.register(_at_exit, self._ref)
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()


def _run(ref: weakref.ref, timer: HeadTimer) -> None:
    while not timer._stop:
        timer._wake.clear()  # before looking: an `arm` from now on wakes the wait below
        lg = ref()
        if lg is None:
            return
        since, interval = lg._unsigned_since, lg.sign_interval
        delay = None if since is None else since + interval - time.monotonic()
        if delay is not None and delay <= 0:
            try:
                lg.sign()
                delay = None
            except Exception as e:  # noqa: BLE001 - the database may be away: try again after an interval
                log.warning("could not sign the audit head: %s", first_line(e))
                delay = interval
        del lg  # no strong reference while waiting
        timer._wake.wait(delay if delay is not None else 60.0)


def _at_exit(ref: weakref.ref) -> None:
    lg = ref()
    if lg is not None and lg._unsigned_since is not None:
        try:
            lg.close()
        except Exception as e:  # noqa: BLE001 - at exit, the database may be gone; the next writer signs
            log.warning("could not sign the audit head at exit: %s", e)
