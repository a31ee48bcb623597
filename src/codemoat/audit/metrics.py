"""Prometheus metrics: one registry per app (no process globals), read at scrape time where live.

Request counts and latency histograms are labelled by route template (`/v1/completions`, never
the raw path, to keep cardinality bounded), protocol and status class. Model, lease and license
facts are read from the model holder when scraped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Completions take milliseconds on a tiny model and seconds on a large one.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _Live:
    """Collects gauges that are read from the server's state at scrape time."""

    def __init__(self, read: Callable[[], dict[str, Any]]):
        self.read = read

    def describe(self):
        return []

    def collect(self):
        s = self.read()
        yield GaugeMetricFamily(
            "codemoat_model_loaded", "1 when the model is loaded and serving, else 0.", value=1 if s.get("loaded") else 0
        )
        g = GaugeMetricFamily("codemoat_queue_depth", "Requests waiting for a generation slot.", value=s.get("queue_depth", 0))
        yield g
        yield GaugeMetricFamily("codemoat_requests_in_flight", "API requests being handled now.", value=s.get("in_flight", 0))
        slots = s.get("engine_slots") or {}
        for key, what in (
            ("total", "Sequence slots of the engine (model.parallel)."),
            ("busy", "Engine slots decoding a request now."),
            ("waiting", "Requests waiting in the engine for a free slot."),
        ):
            if slots.get(key) is not None:
                yield GaugeMetricFamily(f"codemoat_engine_slots_{key}", what, value=slots[key])
        tok = s.get("tokenizer") or {}
        for name, what, label, values in (
            (
                "codemoat_tokenizer_cache_lookups",
                "Texts looked up in the tokeniser's per-user cache of recent texts, by result (a new model starts at 0).",
                "result",
                (("hit", "hits"), ("miss", "misses")),
            ),
            (
                "codemoat_tokenizer_long_texts",
                "Long texts tokenised, by how: from where they grew from one the same user sent (an editor's prefix), or whole.",
                "how",
                (("grown", "grown"), ("whole", "whole")),
            ),
        ):
            if values[0][1] in tok:
                c = CounterMetricFamily(name, what, labels=[label])
                for value, key in values:
                    c.add_metric([value], tok[key])
                yield c
        lease = InfoMetricFamily("codemoat_lease", "License lease state (offline, active, renewing, lost, ...).")
        lease.add_metric(
            [], {"state": str(s.get("lease_state") or "none"), "model_state": str(s.get("model_state") or "unknown")}
        )
        yield lease
        if s.get("expires_at") is not None:
            yield GaugeMetricFamily(
                "codemoat_license_seconds_left",
                "Seconds until the license (or lease) expires.",
                value=float(s["expires_at"]) - time.time(),
            )
        if s.get("lease_seconds_left") is not None:
            yield GaugeMetricFamily(
                "codemoat_lease_seconds_left",
                "Seconds until the key lease lapses without renewal.",
                value=float(s["lease_seconds_left"]),
            )


class Metrics:
    def __init__(self, read_live: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("codemoat_requests", "API requests answered.", ["route", "protocol", "status"], registry=r)
        self.latency = Histogram(
            "codemoat_request_latency_seconds",
            "Time from request to the last byte of the response.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("codemoat_tokens", "Tokens processed.", ["kind"], registry=r)
        self.audit_records = Counter("codemoat_audit_records", "Audit records written.", ["kind"], registry=r)
        self.audit_failures = Counter(
            "codemoat_audit_failures", "Requests refused because the audit log could not be written.", registry=r
        )
        self.egress_blocked = Counter(
            "codemoat_egress_blocked", "Outbound connections or lookups refused by the egress guard.", registry=r
        )
        self.secrets = Counter("codemoat_secrets_found", "Secrets found in prompts (redacted or blocked).", ["kind"], registry=r)
        self.rate_limited = Counter("codemoat_rate_limited", "Requests refused by a quota (429).", registry=r)
        self.alerts = Counter("codemoat_alerts", "Distillation alarms raised.", registry=r)
        r.register(_Live(read_live))

    def observe(self, route: str, protocol: str, status: int, seconds: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests.labels(route, protocol or "none", f"{status // 100}xx").inc()
        self.latency.labels(route).observe(seconds)
        if prompt_tokens:
            self.tokens.labels("prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels("completion").inc(completion_tokens)
        if status == 429:
            self.rate_limited.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
