"""Reading usage: acceptance and activity aggregates, computed by the database (GROUP BY), never
by walking rows in Python.

Acceptance rate = selected / viewed (Tabby's Reports: Σselect / Σview), counted over events tied
to a completion this server handed to that same user; events that name no such completion are
reported apart (`unmatched_events`). Active users used the service in the window; engaged users
accepted at least one completion in it (GitHub Copilot's metrics API draws the same line).
Whole days are read from the daily roll-up (rollup.py), the rest of the first day from the rows.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from ..errors import CodemoatError
from . import rollup as rollup_
from .store import day_of
from .tables import completions, memberships

BY = ("day", "user", "language", "protocol", "group")
WINDOWS = (1, 7, 28)


@dataclass
class Row:
    key: str
    completions: int = 0
    chats: int = 0
    users: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    views: int = 0
    selects: int = 0
    dismisses: int = 0
    accepted_chars: int = 0
    accepted_lines: int = 0

    @property
    def acceptance(self) -> float | None:
        return self.selects / self.views if self.views else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance": None if self.acceptance is None else round(self.acceptance, 4)}


@dataclass
class Report:
    by: str
    since: float | None
    rows: list[Row]
    total: Row
    latency_ms: dict[str, float | None]
    active_users: dict[str, int]
    engaged_users: dict[str, int]
    unmatched_events: int
    generated_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "since": self.since,
            "generated_at": self.generated_at,
            "total": self.total.to_dict(),
            "rows": [r.to_dict() for r in self.rows],
            "latency_ms": self.latency_ms,
            "active_users": self.active_users,
            "engaged_users": self.engaged_users,
            "unmatched_events": self.unmatched_events,
        }


def _one(v) -> int:
    return int(v or 0)


def _sums(f, users: bool = True) -> list:
    """The Row fields summed over a facts subquery (see rollup.facts), users counted once (or 0)."""
    made = f.c.completions + f.c.chats
    return [
        sa.func.sum(f.c.completions).label("completions"),
        sa.func.sum(f.c.chats).label("chats"),
        (sa.func.count(sa.distinct(sa.case((made > 0, f.c.user)))) if users else sa.literal_column("0")).label("users"),
        sa.func.sum(f.c.c_prompt + f.c.h_prompt).label("prompt_tokens"),
        sa.func.sum(f.c.c_output + f.c.h_output).label("completion_tokens"),
        sa.func.sum(f.c.views).label("views"),
        sa.func.sum(f.c.selects).label("selects"),
        sa.func.sum(f.c.dismisses).label("dismisses"),
        sa.func.sum(f.c.accepted_chars).label("accepted_chars"),
        sa.func.sum(f.c.accepted_lines).label("accepted_lines"),
    ]


def _row(key: str, r) -> Row:
    return Row(key, *(_one(getattr(r, n)) for n in ROW_FIELDS))


ROW_FIELDS = (
    "completions",
    "chats",
    "users",
    "prompt_tokens",
    "completion_tokens",
    "views",
    "selects",
    "dismisses",
    "accepted_chars",
    "accepted_lines",
)
PERCENTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99}


def report(
    engine: Engine,
    *,
    by: str = "day",
    since: float | None = None,
    user: str | None = None,
    language: str | None = None,
    now: float | None = None,
    summary: bool = True,
    rollup: bool = True,
) -> Report:
    """Usage since `since` (epoch seconds; None: all), one row per `by` value, newest day first for `by="day"`.

    `summary=False` computes the rows only (total, latency, active and engaged users left empty).
    `rollup=False` scans the raw tables instead of the daily roll-up (same answers, slower)."""
    if by not in BY:
        raise CodemoatError(f"cannot group usage by {by!r}: choose one of {', '.join(BY)}")
    now = time.time() if now is None else now
    # unfiltered, by day, language or protocol: sums from the day x language x protocol grain, users
    # counted from the day x user grain (by day) or the full one; otherwise the full grain throughout
    coarse = user is None and language is None and by in ("day", "language", "protocol")
    f = rollup_.facts(since=since, user=user, language=language, rollup=rollup)
    fs = rollup_.facts(since=since, rollup=rollup, dims=rollup_.LANG_DIMS) if coarse else f
    fu = rollup_.facts(since=since, user=user, rollup=rollup, dims=rollup_.USER_DIMS) if language is None else f
    if by == "group":
        key, src = memberships.c.group, f.join(memberships, memberships.c.user == f.c.user)
    else:
        key, src = fs.c[by], fs
    # a key is shown when it has a completion, a chat or an event tied to a completion (as before the roll-up)
    shown = sa.func.sum(fs.c.completions + fs.c.chats + fs.c.events - fs.c.unmatched) > 0
    q = sa.select(key.label("k"), *_sums(fs, users=not coarse)).select_from(src).group_by(key).having(shown)
    with engine.connect() as c:
        rows = [_row(str(r.k), r) for r in c.execute(q)]
        if coarse:
            fk = fu if by == "day" else f
            made = sa.case((fk.c.completions + fk.c.chats > 0, fk.c.user))
            users = dict(c.execute(sa.select(fk.c[by], sa.func.count(sa.distinct(made))).group_by(fk.c[by])).tuples().all())
            for row in rows:
                row.users = _one(users.get(row.key))
        if not summary:
            total, latency, active, engaged, unmatched = Row("total"), {}, {}, {}, 0
        else:
            r = c.execute(sa.select(*_sums(fs, users=False), sa.func.sum(fs.c.unmatched).label("unmatched"))).one()
            total, unmatched = _row("total", r), _one(r.unmatched)
            made = sa.case((fu.c.completions + fu.c.chats > 0, fu.c.user))
            total.users = _one(c.execute(sa.select(sa.func.count(sa.distinct(made)))).scalar())
            latency = _latency(c, since, user, language, rollup)
            active, engaged = _windows(c, now, user, rollup)
    ordered = (
        sorted(rows, key=lambda r: r.key, reverse=True)
        if by == "day"
        else sorted(rows, key=lambda r: (-r.completions - r.chats, r.key))
    )
    return Report(by, since, ordered, total, latency, active, engaged, unmatched)


def _latency(c, since, user, language, rollup: bool) -> dict[str, float | None]:
    """p50/p95/p99 of completion latency, to the bucket (rollup.bucket). Unfiltered: from the daily
    histogram; for one user or language (the histogram has neither): the row at each rank, read
    through the latency index."""
    if user is None and language is None:
        return rollup_.percentiles(rollup_.latency_buckets(c, since=since, rollup=rollup), PERCENTILES)
    conds = [completions.c.kind == "completion"]
    conds += [completions.c.ts >= since] if since is not None else []
    conds += [completions.c.user == user] if user is not None else []
    conds += [completions.c.language == language] if language is not None else []
    n = _one(c.execute(sa.select(sa.func.count()).select_from(completions).where(*conds)).scalar())
    out: dict[str, float | None] = {}
    for name, q in PERCENTILES.items():
        if n == 0:
            out[name] = None
            continue
        v = c.execute(
            sa.select(completions.c.latency_ms).where(*conds).order_by(completions.c.latency_ms).offset(int(q * (n - 1))).limit(1)
        ).scalar()
        out[name] = float(rollup_.bucket(float(v)))
    return out


def _windows(c, now: float, user: str | None, rollup: bool = True) -> tuple[dict[str, int], dict[str, int]]:
    """(active, engaged) users for each of `WINDOWS` (the last 1, 7, 28 UTC days, today included):
    active used the service (a completion, a chat or any editor event), engaged accepted a completion."""
    f = rollup_.facts(since=rollup_.whole_days(max(WINDOWS), now), user=user, rollup=rollup, dims=rollup_.USER_DIMS)
    cols = []
    for d in WINDOWS:
        in_w = f.c.day >= day_of(rollup_.whole_days(d, now))
        cols.append(sa.func.count(sa.distinct(sa.case((sa.and_(in_w, f.c.completions + f.c.chats + f.c.events > 0), f.c.user)))))
        cols.append(sa.func.count(sa.distinct(sa.case((sa.and_(in_w, f.c.selects > 0), f.c.user)))))
    r = c.execute(sa.select(*cols)).one()
    active = {f"{d}d": _one(r[2 * i]) for i, d in enumerate(WINDOWS)}
    engaged = {f"{d}d": _one(r[2 * i + 1]) for i, d in enumerate(WINDOWS)}
    return active, engaged


def daily(engine: Engine, days: int = 30, *, now: float | None = None) -> list[Row]:
    """One row per UTC day for the last `days` days, oldest first, days without use included (zeros)."""
    now = time.time() if now is None else now
    rep = report(engine, by="day", since=rollup_.whole_days(days, now), now=now, summary=False)
    have = {r.key: r for r in rep.rows}
    out = []
    for i in range(days - 1, -1, -1):
        d = day_of(now - i * 86400)
        out.append(have.get(d, Row(d)))
    return out
