"""The lease kept: renewed in the background, and the model told when it must go (or may come back).

`LeaseKeeper` renews at `renew_fraction` of the TTL (half by default, as in DHCP's T1,
RFC 2131 §4.4.5). When renewals fail it keeps the model until the lease's expiry plus the
license's grace, then calls `on_lost`; a revoked license is lost at once. When a renewal
succeeds again it calls `on_regained`. Deadlines use the monotonic clock from the moment the
request was sent, so neither the server's clock nor a changed wall clock stretches a lease.
Asking, proving and checking each answer is `lease.LeaseClient`'s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

from ..deadline import ANSWER_TIMEOUTS, settle
from .clock import Clock
from .codec import VaultError
from .keyserver import TERMINAL, LeaseDenied
from .lease import Lease, LeaseClient, Unreachable

log = logging.getLogger("codemoat.vault")


class LeaseKeeper:
    """Renews a lease in the background and says when the model must go (or may come back)."""

    def __init__(
        self,
        client: LeaseClient,
        lease: Lease,
        *,
        on_lost: Callable[[str], None],
        on_regained: Callable[[Lease], None],
        clock: Clock | None = None,
        renew_fraction: float = 0.5,
    ):
        self.client, self.lease, self.clock = client, lease, clock or client.clock
        self.on_lost, self.on_regained = on_lost, on_regained
        self.fraction = renew_fraction
        self.state = "held"
        self.last_error: str | None = None
        self.renewals = 0
        self.failures = 0  # failed attempts since the last renewal
        # wall time of the last lease granted (the first one: when it was asked for)
        self.renewed_at = self.clock.time() - (self.clock.monotonic() - lease.sent_at)
        self.next_attempt = lease.sent_at + lease.ttl * renew_fraction
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._asking: Future[Lease] | None = None  # a renewal sent and not answered yet

    def _acquire(self) -> Lease:
        """client.acquire(), or Unreachable when its answer is not complete within ANSWER_TIMEOUTS times the
        client's timeout: httpx's timeout bounds each read, not the answer, so a server or proxy sending a
        byte every few seconds held the keeper here for good, its deadline never checked. The request goes
        on in its own thread; no other is sent until it ends (a late answer is taken at the next attempt)."""
        if self._asking is None:
            self._asking = Future()
            threading.Thread(
                target=settle, args=(self._asking, self.client.acquire), name="codemoat-lease-ask", daemon=True
            ).start()
        asking, limit = self._asking, self.client.timeout * ANSWER_TIMEOUTS
        if not wait([asking], timeout=limit).done:
            raise Unreachable(f"key server at {self.client.url} sent no complete answer in {limit:g} s")
        self._asking = None
        return asking.result()

    @property
    def deadline(self) -> float:
        """Monotonic time after which the model must be unloaded unless a renewal succeeds."""
        return self.lease.expires_at + self.lease.grace

    def seconds_left(self) -> float:
        return self.lease.expires_at - self.clock.monotonic()

    def retry_interval(self) -> float:
        return max(1.0, min(30.0, self.lease.ttl / 10))

    def tick(self) -> None:
        """One step: renew when due, unload when the deadline passed; safe to call at any time."""
        now = self.clock.monotonic()
        if now >= self.next_attempt:
            try:
                lease = self._acquire()
            except LeaseDenied as e:
                self.last_error, self.failures = str(e), self.failures + 1
                self.next_attempt = now + (self.lease.ttl * self.fraction if e.code in TERMINAL else self.retry_interval())
                if e.code in TERMINAL and self.state != "revoked":
                    self.state = "revoked"
                    self.on_lost(f"license {e.code.replace('_', ' ')}: {e}")
                    return
            except Exception as e:  # not only VaultError: whatever an answer raises is a failed renewal, never "held" on
                self.last_error = str(e) if isinstance(e, VaultError) else f"{type(e).__name__}: {e}"
                self.failures, self.next_attempt = self.failures + 1, now + self.retry_interval()
            else:
                self.lease, self.last_error, self.renewals = lease, None, self.renewals + 1
                self.failures, self.renewed_at = 0, self.clock.time()
                self.next_attempt = lease.sent_at + lease.ttl * self.fraction
                lost = self.state in ("lost", "revoked")
                self.state = "held"
                if lost:
                    self.on_regained(lease)
                return
            if self.state == "held":
                self.state = "renewing"
        if self.state == "renewing" and now >= self.deadline:
            self.state = "lost"
            self.on_lost(f"lease expired and could not be renewed ({self.last_error})")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # the keeper must never die silently: treat as a failed renewal
                self.last_error = f"{type(e).__name__}: {e}"
            now = self.clock.monotonic()
            due = self.next_attempt if self.state != "renewing" else min(self.next_attempt, self.deadline)
            self.clock.wait(self._stop, max(0.01, due - now))

    def start(self) -> LeaseKeeper:
        self._thread = threading.Thread(target=self._run, name="codemoat-lease", daemon=True)
        self._thread.start()
        return self

    def stop(self, release: bool = False) -> None:
        """End the keeper; with `release`, give the seat back, waiting at most ANSWER_TIMEOUTS times the client's
        timeout (a tarpit must not hold a shutdown: the key server ends an unreleased lease at its TTL + grace)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if release:
            try:
                self.client.bounded(self.client.release)
            except Unreachable as e:
                log.warning("lease release abandoned (the seat frees itself at the lease's end): %s", e)
        self.client.close()

    def describe(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "seconds_left": round(self.seconds_left(), 1),
            "renewals": self.renewals,
            "last_error": self.last_error,
            "renewed_at": self.renewed_at,  # wall time of the last lease granted
            "next_renewal_in": round(self.next_attempt - self.clock.monotonic(), 1),
            "failures": self.failures,
            "key_server": self.client.destination,  # host:port only: never a URL's userinfo
            "ttl": self.lease.ttl,
            "grace": self.lease.grace,
            "seats": self.lease.seats,
            "seats_used": self.lease.seats_used,
        }
