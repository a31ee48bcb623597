"""Distillation alarms: per-user usage profiles, and heuristics for extraction-like use.

Someone distilling the model through the API needs many diverse prompts and long answers, sent
by a script that does not stop; a developer, even a very busy one, sends prompts that overlap
(the same files, typed a few characters at a time), takes breaks, and gets short completions of
which the editor reports some as accepted. Published extraction attacks (Tramèr et al.,
"Stealing Machine Learning Models via Prediction APIs", USENIX Security 2016; Carlini et al.,
"Stealing Part of a Production Language Model", ICML 2024) all need query volume and diversity
far above interactive use, which is what these signals measure over a sliding window
(default one hour) per user:

* **volume**: requests in the window ≥ `volume_factor` × the baseline, where the baseline is the
  largest of the user's own median hourly volume (earlier hours of the last week, read back from
  the audit log at start-up), the team's median (other
  users in the window) and `min_baseline` requests per hour.
* **novelty**: the share of prompts that resemble none of the user's previous `recent` prompts
  (Jaccard similarity of their sets of non-trivial lines < `similar`) is ≥ `novelty`.
  Editor completions re-send the same file with small edits, so their novelty is low.
* **sustained**: the user was active in ≥ `sustained` of the minutes of a window spanning at
  least 30 minutes: scripts do not take breaks.
* **long_unaccepted**: completions (not chat) average ≥ `long_tokens` generated tokens and fewer
  than `accept_rate` of them were followed by an editor acceptance event (Tabby `select`/`accept`).

A user is flagged when **volume** holds together with at least two of the others, or when all
three others hold (a slow, steady extraction). Alerts go into the audit log (kind `alert`), at
most one per user per `cooldown_s`; optionally the user is throttled for an hour.

Prompts are reduced to sets of line hashes in memory and never stored.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

ACCEPT_EVENTS = frozenset({"select", "accept", "accepted"})


@dataclass
class AlarmPolicy:
    window_s: float = 3600
    min_requests: int = 100
    every: int = 20
    volume_factor: float = 5.0
    min_baseline: float = 60.0
    recent: int = 16
    similar: float = 0.3
    novelty: float = 0.8
    sustained: float = 0.8
    long_tokens: float = 128.0
    accept_rate: float = 0.01
    cooldown_s: float = 3600
    throttle_rpm: int = 0  # 0 = do not throttle flagged users


@dataclass
class _Event:
    t: float
    kind: str  # completion | chat | event
    novel: bool
    completion_tokens: int
    accepted: bool


@dataclass
class _Profile:
    """One user's window, kept with running sums, so that a signal costs the same after an hour of
    traffic as after a minute (it was a walk over every event in the window, per evaluation)."""

    reqs: deque = field(default_factory=deque)  # completions and chats (`_Event`s) in the window, oldest first
    accepts: deque = field(default_factory=deque)  # times of acceptance events in the window
    novel: int = 0  # sums over `reqs`
    comps: int = 0
    comp_tokens: int = 0
    minutes: dict[int, int] = field(default_factory=dict)  # minute -> requests in it
    recent: deque = field(default_factory=deque)  # line-hash sets of the last prompts
    hourly: dict[int, int] = field(default_factory=dict)
    since_eval: int = 0
    last_alert: float = -1e18

    def add(self, e: _Event) -> None:
        self.reqs.append(e)
        self.novel += e.novel
        if e.kind == "completion":
            self.comps += 1
            self.comp_tokens += e.completion_tokens
        m = int(e.t // 60)
        self.minutes[m] = self.minutes.get(m, 0) + 1

    def prune(self, cutoff: float) -> None:
        """Drop what happened before `cutoff` (the window's start)."""
        reqs, minutes = self.reqs, self.minutes
        while reqs and reqs[0].t < cutoff:
            e = reqs.popleft()
            self.novel -= e.novel
            if e.kind == "completion":
                self.comps -= 1
                self.comp_tokens -= e.completion_tokens
            m = int(e.t // 60)
            if minutes[m] <= 1:
                del minutes[m]
            else:
                minutes[m] -= 1
        while self.accepts and self.accepts[0] < cutoff:
            self.accepts.popleft()


@dataclass(frozen=True)
class Alert:
    user: str
    signals: dict[str, Any]
    reasons: list[str]


def line_set(text: str, cap: int = 400) -> frozenset[int]:
    """Hashes of the prompt's non-trivial lines (the unit editors re-send)."""
    out = set()
    for line in text.splitlines():
        s = line.strip()
        if len(s) >= 8:
            out.add(hash(s))
            if len(out) >= cap:
                break
    return frozenset(out)


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    if not a or not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


class Alarms:
    """Per-user profiles fed one request at a time; `observe` returns an `Alert` when one fires."""

    def __init__(self, policy: AlarmPolicy | None = None):
        self.policy = policy or AlarmPolicy()
        self._profiles: dict[str, _Profile] = {}
        self._lock = threading.Lock()

    def observe(
        self,
        user: str,
        *,
        t: float | None = None,
        kind: str = "completion",
        prompt_text: str = "",
        completion_tokens: int = 0,
        event: str | None = None,
    ) -> Alert | None:
        p = self.policy
        lines = line_set(prompt_text) if kind != "event" else frozenset()
        with self._lock:
            t = time.time() if t is None else t  # under the lock: the window's events stay in time order
            prof = self._profiles.setdefault(user, _Profile())
            if kind == "event":
                if event in ACCEPT_EVENTS:
                    prof.accepts.append(t)
                return None
            novel = bool(lines) and all(jaccard(lines, prev) < p.similar for prev in prof.recent)
            prof.recent.append(lines)
            if len(prof.recent) > p.recent:
                prof.recent.popleft()
            prof.add(_Event(t, kind, novel, completion_tokens, False))
            hour = int(t // 3600)
            prof.hourly[hour] = prof.hourly.get(hour, 0) + 1
            prof.prune(t - p.window_s)
            for h in [h for h in prof.hourly if h < hour - 24 * 7]:
                del prof.hourly[h]
            prof.since_eval += 1
            if prof.since_eval < p.every:
                return None
            prof.since_eval = 0
            alert = self._evaluate(user, prof, t)
            if alert is not None:
                prof.last_alert = t
            return alert

    def _team_median(self, user: str, t: float) -> float:
        counts = []
        for u, prof in self._profiles.items():
            if u == user:
                continue
            prof.prune(t - self.policy.window_s)
            if prof.reqs:
                counts.append(len(prof.reqs))
        return statistics.median(counts) if counts else 0.0

    def signals(self, user: str, t: float | None = None) -> dict[str, Any]:
        """The numbers behind the heuristics for `user` now (for alerts and the admin API)."""
        with self._lock:
            return self._signals(user, time.time() if t is None else t)

    def _signals(self, user: str, t: float) -> dict[str, Any]:
        prof = self._profiles.get(user)
        if prof is None:
            return {}
        p = self.policy
        prof.prune(t - p.window_s)
        reqs = prof.reqs
        n = len(reqs)
        hour = int(t // 3600)
        own = statistics.median([c for h, c in prof.hourly.items() if h < hour]) if any(h < hour for h in prof.hourly) else 0.0
        scale = 3600 / p.window_s
        team = self._team_median(user, t)
        baseline = max(own / scale, team, p.min_baseline / scale)
        span = (reqs[-1].t - reqs[0].t) if n > 1 else 0.0
        window_minutes = max(1, int(span // 60) + 1)
        comps = prof.comps
        return {
            "requests": n,
            "baseline": round(baseline, 1),
            "own_hourly_median": own,
            "team_median": team,
            "novelty": round(prof.novel / n, 3) if n else 0.0,
            "active_minute_share": round(len(prof.minutes) / window_minutes, 3),
            "span_s": round(span, 1),
            "completions": comps,
            "mean_completion_tokens": round(prof.comp_tokens / comps, 1) if comps else 0.0,
            "accept_rate": round(len(prof.accepts) / comps, 4) if comps else 0.0,
        }

    def _evaluate(self, user: str, prof: _Profile, t: float) -> Alert | None:
        p = self.policy
        s = self._signals(user, t)
        if s["requests"] < p.min_requests or t - prof.last_alert < p.cooldown_s:
            return None
        hits = {
            "volume": s["requests"] >= p.volume_factor * s["baseline"],
            "novelty": s["novelty"] >= p.novelty,
            "sustained": s["span_s"] >= 1800 and s["active_minute_share"] >= p.sustained,
            "long_unaccepted": s["completions"] >= p.min_requests // 2
            and s["mean_completion_tokens"] >= p.long_tokens
            and s["accept_rate"] < p.accept_rate,
        }
        others = sum(hits[k] for k in ("novelty", "sustained", "long_unaccepted"))
        if (hits["volume"] and others >= 2) or others == 3:
            return Alert(user, s, [k for k, v in hits.items() if v])
        return None

    def users(self) -> list[str]:
        return sorted(self._profiles)

    def seed(self, audit_log, days: int = 7, now: float | None = None) -> int:
        """Load each user's hourly request counts of the last `days` from the audit log, so that
        their own baseline survives a restart. Returns the number of (user, hour) buckets read."""
        import sqlalchemy as sa

        from .log import records

        from .reading import withheld_named

        now = time.time() if now is None else now
        since = int((now - days * 86400) * 1_000_000)
        hour = sa.cast(records.c.ts_us / 3_600_000_000, sa.BigInteger)
        n = 0
        with audit_log.engine.connect() as c, self._lock:
            q = (
                sa.select(records.c.user, hour, sa.func.count())
                .where(
                    records.c.kind == "request",
                    records.c.user.is_not(None),
                    records.c.status < 300,
                    records.c.ts_us >= since,
                    records.c.seq.not_in(withheld_named(c, since)),  # answers their clients never got
                )
                .group_by(records.c.user, hour)
            )
            for user, h, count in c.execute(q):
                prof = self._profiles.setdefault(user, _Profile())
                prof.hourly[int(h)] = prof.hourly.get(int(h), 0) + int(count)
                n += 1
        return n
