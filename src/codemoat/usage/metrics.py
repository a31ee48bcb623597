"""Usage numbers for Prometheus (`/metrics`): acceptance rate, active and engaged users, completions
and editor events over the last 1, 7 and 28 UTC days (today included), read from the shared database at scrape time
(so every replica reports the same numbers) and cached for `ttl` seconds."""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa
from sqlalchemy import Engine

from .report import WINDOWS, _windows
from .rollup import LANG_DIMS, facts, whole_days


class UsageCollector:
    def __init__(self, engine: Engine, ttl: float = 60.0):
        self.engine, self.ttl = engine, ttl
        self._lock = threading.Lock()
        self._at = 0.0
        self._values: dict[str, dict[str, float]] = {}

    def describe(self):
        return []

    def read(self) -> dict[str, dict[str, float]]:
        """{metric: {window: value}}, recomputed at most every `ttl` seconds."""
        with self._lock:
            if time.monotonic() - self._at < self.ttl and self._values:
                return self._values
            now = time.time()
            out: dict[str, dict[str, float]] = {
                k: {} for k in ("completions", "views", "selects", "acceptance", "active", "engaged")
            }
            with self.engine.connect() as c:
                for d in WINDOWS:
                    w = f"{d}d"
                    f = facts(since=whole_days(d, now), dims=LANG_DIMS)
                    n, views, selects = c.execute(
                        sa.select(sa.func.sum(f.c.completions + f.c.chats), sa.func.sum(f.c.views), sa.func.sum(f.c.selects))
                    ).one()
                    out["completions"][w], out["views"][w], out["selects"][w] = (
                        float(n or 0),
                        float(views or 0),
                        float(selects or 0),
                    )
                    if views:
                        out["acceptance"][w] = float(selects or 0) / float(views)

                active, engaged = _windows(c, now, None)
            out["active"] = {w: float(x) for w, x in active.items()}
            out["engaged"] = {w: float(x) for w, x in engaged.items()}
            self._values, self._at = out, time.monotonic()
            return out

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        v = self.read()
        helps = {
            "completions": ("codemoat_usage_completions", "Completions and chats served in the window (all replicas)."),
            "views": ("codemoat_usage_views", "Completions editors reported as shown, in the window."),
            "selects": ("codemoat_usage_selects", "Completions editors reported as accepted, in the window."),
            "acceptance": ("codemoat_usage_acceptance_ratio", "Accepted / shown completions in the window."),
            "active": ("codemoat_usage_active_users", "Users with a completion, chat or editor event in the window."),
            "engaged": ("codemoat_usage_engaged_users", "Users who accepted at least one completion in the window."),
        }
        for key, (name, text) in helps.items():
            g = GaugeMetricFamily(name, text, labels=["window"])
            for w, x in v[key].items():
                g.add_metric([w], x)
            yield g
