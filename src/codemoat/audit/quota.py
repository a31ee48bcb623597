"""Quotas: requests per minute and generated tokens per day, per token and per user.

Requests per minute use a sliding 60-second window (exact, one timestamp per admitted request);
`Retry-After` is the time until the oldest request in the window leaves it. Tokens per day count
generated (completion) tokens per UTC day; `Retry-After` is the time until the next UTC midnight.
Both limits apply to the token and to its user, so a user cannot multiply a limit by minting
tokens. The daily counters are seeded from the audit log at start-up, so a restart does not
reset anyone's day. A user flagged by the distillation alarms can be throttled to a lower rate.

Requests per minute are per process. With a database (`engine`), the daily token budget lives in
it (`quota_shared`): every replica on one PostgreSQL spends the same budget, atomically, and it
survives restarts without seeding. Without one, both are per process, seeded from the audit log.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from datetime import datetime, UTC

from ..errors import RateLimited


#: how far a window's newest time may be ahead of now before the clock counts as set back (and the window starts
#: again): requests whose times were taken in another order than they reach the window are never that far apart
CLOCK_STEP_S = 1.0


def _day(t: float) -> int:
    return int(t // 86400)


def seconds_to_midnight(t: float) -> float:
    return 86400 - (t % 86400)


class Quotas:
    def __init__(self, requests_per_minute: int = 0, tokens_per_day: int = 0, engine=None):
        from .quota_shared import SharedDailyTokens

        self.rpm = requests_per_minute
        self.tpd = tokens_per_day
        #: the daily budget in the shared database (None: in this process only)
        self.shared = SharedDailyTokens(engine) if engine is not None and tokens_per_day else None
        self._lock = threading.Lock()
        self._windows: dict[str, deque[float]] = {}
        self._tokens: dict[str, tuple[int, int]] = {}  # key -> (day, generated tokens)
        self._throttle: dict[str, tuple[int, float]] = {}  # user -> (rpm, until)
        self.refused = 0

    @property
    def active(self) -> bool:
        return bool(self.rpm or self.tpd or self._throttle)

    def throttle(self, user: str, rpm: int, seconds: float) -> None:
        """Cap `user` at `rpm` requests per minute for `seconds` (distillation alarm)."""
        with self._lock:
            self._throttle[user] = (rpm, time.time() + seconds)

    def throttled(self, user: str) -> int | None:
        t = self._throttle.get(user)
        if t is None:
            return None
        if t[1] < time.time():
            self._throttle.pop(user, None)
            return None
        return t[0]

    def check(self, user: str, token_id: str, now: float | None = None) -> None:
        """Admit one request or raise `RateLimited` with the seconds to wait."""
        given = now
        now = time.time() if now is None else now
        keys = (f"token:{token_id}", f"user:{user}")
        if self.shared is not None:
            spent = self.shared.admit(keys, _day(now), self.tpd)
            if spent is not None:
                with self._lock:
                    self.refused += 1
                raise self._spent(spent, now)
        with self._lock:
            if self.tpd and self.shared is None:
                for k in keys:
                    day, used = self._tokens.get(k, (_day(now), 0))
                    if day == _day(now) and used >= self.tpd:
                        self.refused += 1
                        raise self._spent(k, now)
            limits = [(k, self.rpm) for k in keys] if self.rpm else []
            cap = self.throttled(user)
            if cap is not None:
                limits.append((f"throttle:{user}", cap))
            if given is None:  # read under the lock: requests enter their windows in the order of their times (the
                now = time.time()  # daily budget's round trip to a shared database came between, out of order)
            for k, limit in limits:
                w = self._windows.setdefault(k, deque())
                if w and w[-1] > now + CLOCK_STEP_S:  # the clock was set back (NTP stepped it): a window ahead of now,
                    w.clear()  # kept until the clock caught up, refused everyone for as long as it went back
                while w and w[0] <= now - 60:
                    w.popleft()
                if len(w) >= limit:
                    self.refused += 1
                    who = {"token": "token", "user": "user", "throttle": "user (throttled by a distillation alarm)"}[
                        k.split(":")[0]
                    ]
                    raise RateLimited(
                        f"rate limit of {limit} requests per minute reached for this {who}", max(0.001, w[0] + 60 - now)
                    )
            for k, _ in limits:
                self._windows[k].append(now)

    def _spent(self, key: str, now: float) -> RateLimited:
        who = "token" if key.startswith("token:") else "user"
        return RateLimited(
            f"daily token quota of {self.tpd} generated tokens reached for this {who}; it resets at 00:00 UTC",
            seconds_to_midnight(now),
        )

    def add_tokens(self, user: str, token_id: str, n: int, now: float | None = None) -> None:
        """Count `n` generated tokens of an admitted request against the day's quota (shared: the
        token `check` reserved is one of them, or is given back when it generated none)."""
        now = time.time() if now is None else now
        if self.shared is not None:
            self.shared.add((f"token:{token_id}", f"user:{user}"), _day(now), max(n, 0) - 1)
            return
        if n <= 0:
            return
        with self._lock:
            for k in (f"token:{token_id}", f"user:{user}"):
                day, used = self._tokens.get(k, (_day(now), 0))
                self._tokens[k] = (_day(now), (used if day == _day(now) else 0) + n)

    def used_today(self, user: str | None = None, token_id: str | None = None) -> int:
        k = f"user:{user}" if user is not None else f"token:{token_id}"
        if self.shared is not None:
            return self.shared.used(k, _day(time.time()))
        day, used = self._tokens.get(k, (0, 0))
        return used if day == _day(time.time()) else 0

    def seed(self, audit_log) -> None:
        """Load today's generated tokens per user and token from the audit log (in-process budgets
        only: a shared one is already in the database)."""
        if self.shared is not None:
            return
        import sqlalchemy as sa

        from .log import records
        from .reading import withheld_named

        midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
        since = int(midnight * 1_000_000)
        with audit_log.engine.connect() as c:
            withheld = withheld_named(c, since)  # answers whose client got a 503 although their record is in the chain
            q = (
                sa.select(records.c.user, records.c.token_id, sa.func.sum(records.c.completion_tokens))
                .where(records.c.ts_us >= since, records.c.kind == "request", records.c.user.is_not(None))
                .where(records.c.seq.not_in(withheld))
                .group_by(records.c.user, records.c.token_id)
            )
            for user, token_id, n in c.execute(q):
                self.add_tokens(user, token_id or "", int(n or 0), now=max(midnight, time.time()))
