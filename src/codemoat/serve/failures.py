"""Requests without a valid token, tallied per source instead of one audit record each.

Anyone who can reach the port can send them, as fast as the network allows: writing a signed
record for each would let an anonymous client fill the disk (and a full disk refuses everyone,
since nothing is served unaudited). So the first such request from a source in each interval is
recorded as usual; the rest are counted, and when the interval is over one summary record says
how many there were, with which statuses and on which routes (route templates or "unmatched",
never the path the client sent). The table is bounded: past `max_sources` sources, new ones share
one overflow entry ("*").
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

OVERFLOW = "*"


@dataclass
class Tally:
    source: str
    since: float  # when the interval began (its first request, recorded on its own)
    until: float = 0.0  # the last request counted
    count: int = 0  # requests after the first, not recorded one by one
    statuses: Counter = field(default_factory=Counter)
    routes: Counter = field(default_factory=Counter)

    def detail(self) -> dict:
        return {
            "count": self.count,
            "since": round(self.since, 3),
            "until": round(self.until, 3),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "routes": dict(sorted(self.routes.items())),
        }


class FailureTally:
    def __init__(self, interval: float = 60.0, max_sources: int = 4096):
        self.interval, self.max_sources = interval, max_sources
        self._open: dict[str, Tally] = {}
        self._lock = threading.Lock()  # audit writes run on worker threads
        self._swept = 0.0

    def observe(self, source: str | None, status: int, route: str, now: float | None = None) -> tuple[bool, list[Tally]]:
        """Whether to record this request on its own, and the tallies whose interval has ended."""
        now = time.time() if now is None else now
        source = source or "unknown"
        with self._lock:
            done = self._sweep(now)
            t = self._open.get(source)
            if t is None and len(self._open) >= self.max_sources:
                source, t = OVERFLOW, self._open.get(OVERFLOW)
            if t is None:
                self._open[source] = Tally(source, now)
                return True, done
            t.count += 1
            t.until = now
            t.statuses[status] += 1
            t.routes[route] += 1
            return False, done

    def due(self, now: float | None = None) -> list[Tally]:
        """Tallies whose interval has ended (at most one sweep of the table a second)."""
        now = time.time() if now is None else now
        with self._lock:
            return self._sweep(now)

    def drain(self) -> list[Tally]:
        """Every tally with a count, interval over or not (at shutdown)."""
        with self._lock:
            out = [t for t in self._open.values() if t.count]
            self._open.clear()
            return out

    def _sweep(self, now: float) -> list[Tally]:
        if now - self._swept < min(1.0, self.interval):
            return []
        self._swept = now
        ended = [s for s, t in self._open.items() if now - t.since >= self.interval]
        return [t for t in (self._open.pop(s) for s in ended) if t.count]
