"""Reading usage: acceptance and activity aggregates, computed by the database (GROUP BY), never
by walking rows in Python.

Acceptance rate = selected / viewed (Tabby's Reports: Σselect / Σview), counted over events tied
to a completion this server handed to that same user; events that name no such completion are
reported apart (`unmatched_events`). Active users used the service in the window; engaged users
accepted at least one completion in it (GitHub Copilot's metrics API draws the same line).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from ..errors import CodemoatError
from .tables import completions, events, memberships

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


def _key(table: sa.Table, by: str):
    """(column to group on, FROM clause) for one grouping."""
    if by == "group":
        return memberships.c.group, table.join(memberships, memberships.c.user == table.c.user)
    return table.c[by], table


def _one(v) -> int:
    return int(v or 0)


def report(
    engine: Engine,
    *,
    by: str = "day",
    since: float | None = None,
    user: str | None = None,
    language: str | None = None,
    now: float | None = None,
    summary: bool = True,
) -> Report:
    """Usage since `since` (epoch seconds; None: all), one row per `by` value, newest day first for `by="day"`.

    `summary=False` computes the rows only (total, latency, active and engaged users left empty)."""
    if by not in BY:
        raise CodemoatError(f"cannot group usage by {by!r}: choose one of {', '.join(BY)}")
    now = time.time() if now is None else now
    rows: dict[str, Row] = {}

    def where(t: sa.Table):
        conds = []
        if since is not None:
            conds.append(t.c.ts >= since)
        if user is not None:
            conds.append(t.c.user == user)
        if language is not None:
            conds.append(t.c.language == language)
        return conds

    c_is = completions.c.kind
    key, src = _key(completions, by)
    q_c = (
        sa.select(
            key.label("k"),
            sa.func.sum(sa.case((c_is == "completion", 1), else_=0)).label("completions"),
            sa.func.sum(sa.case((c_is == "chat", 1), else_=0)).label("chats"),
            sa.func.count(sa.distinct(completions.c.user)).label("users"),
            sa.func.sum(completions.c.prompt_tokens).label("pt"),
            sa.func.sum(completions.c.completion_tokens).label("ct"),
        )
        .select_from(src)
        .where(*where(completions))
        .group_by(key)
    )
    e_t = events.c.type
    key_e, src_e = _key(events, by)
    q_e = (
        sa.select(
            key_e.label("k"),
            sa.func.sum(sa.case((e_t == "view", 1), else_=0)).label("views"),
            sa.func.sum(sa.case((e_t == "select", 1), else_=0)).label("selects"),
            sa.func.sum(sa.case((e_t == "dismiss", 1), else_=0)).label("dismisses"),
            sa.func.sum(sa.case((e_t == "select", events.c.chars), else_=0)).label("chars"),
            sa.func.sum(sa.case((e_t == "select", events.c.lines), else_=0)).label("lines"),
        )
        .select_from(src_e)
        .where(events.c.matched.is_(True), *where(events))
        .group_by(key_e)
    )
    with engine.connect() as c:
        for r in c.execute(q_c):
            row = rows.setdefault(str(r.k), Row(str(r.k)))
            row.completions, row.chats, row.users = _one(r.completions), _one(r.chats), _one(r.users)
            row.prompt_tokens, row.completion_tokens = _one(r.pt), _one(r.ct)
        for r in c.execute(q_e):
            row = rows.setdefault(str(r.k), Row(str(r.k)))
            row.views, row.selects, row.dismisses = _one(r.views), _one(r.selects), _one(r.dismisses)
            row.accepted_chars, row.accepted_lines = _one(r.chars), _one(r.lines)
        if not summary:
            total, latency, active, engaged, unmatched = Row("total"), {}, {}, {}, 0
        else:
            total = _total(c, where)
            latency = _latency(c, where)
            active, engaged = _windows(c, now, user)
            unmatched = _one(
                c.execute(
                    sa.select(sa.func.count()).select_from(events).where(events.c.matched.is_(False), *where(events))
                ).scalar()
            )
    ordered = (
        sorted(rows.values(), key=lambda r: r.key, reverse=True)
        if by == "day"
        else sorted(rows.values(), key=lambda r: (-r.completions - r.chats, r.key))
    )
    return Report(by, since, ordered, total, latency, active, engaged, unmatched)


def _total(c, where) -> Row:
    t = Row("total")
    r = c.execute(
        sa.select(
            sa.func.sum(sa.case((completions.c.kind == "completion", 1), else_=0)),
            sa.func.sum(sa.case((completions.c.kind == "chat", 1), else_=0)),
            sa.func.count(sa.distinct(completions.c.user)),
            sa.func.sum(completions.c.prompt_tokens),
            sa.func.sum(completions.c.completion_tokens),
        ).where(*where(completions))
    ).one()
    t.completions, t.chats, t.users, t.prompt_tokens, t.completion_tokens = (_one(v) for v in r)
    e_t = events.c.type
    r = c.execute(
        sa.select(
            sa.func.sum(sa.case((e_t == "view", 1), else_=0)),
            sa.func.sum(sa.case((e_t == "select", 1), else_=0)),
            sa.func.sum(sa.case((e_t == "dismiss", 1), else_=0)),
            sa.func.sum(sa.case((e_t == "select", events.c.chars), else_=0)),
            sa.func.sum(sa.case((e_t == "select", events.c.lines), else_=0)),
        ).where(events.c.matched.is_(True), *where(events))
    ).one()
    t.views, t.selects, t.dismisses, t.accepted_chars, t.accepted_lines = (_one(v) for v in r)
    return t


def _latency(c, where) -> dict[str, float | None]:
    """p50/p95/p99 of completion latency: the row at each rank, read through the latency index."""
    conds = [completions.c.kind == "completion", *where(completions)]
    n = _one(c.execute(sa.select(sa.func.count()).select_from(completions).where(*conds)).scalar())
    out: dict[str, float | None] = {}
    for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        if n == 0:
            out[name] = None
            continue
        v = c.execute(
            sa.select(completions.c.latency_ms).where(*conds).order_by(completions.c.latency_ms).offset(int(q * (n - 1))).limit(1)
        ).scalar()
        out[name] = round(float(v), 1)
    return out


def _windows(c, now: float, user: str | None) -> tuple[dict[str, int], dict[str, int]]:
    """(active, engaged) users for each of `WINDOWS`: each table grouped by user once (its last
    activity, and its last acceptance), the per-user maxima then merged (one row per user)."""
    starts = {f"{d}d": now - d * 86400 for d in WINDOWS}
    oldest = min(starts.values())
    accepted = sa.and_(events.c.type == "select", events.c.matched.is_(True))
    qa = (
        sa.select(completions.c.user, sa.func.max(completions.c.ts))
        .where(completions.c.ts >= oldest)
        .group_by(completions.c.user)
    )
    qb = (
        sa.select(events.c.user, sa.func.max(events.c.ts), sa.func.max(sa.case((accepted, events.c.ts))))
        .where(events.c.ts >= oldest)
        .group_by(events.c.user)
    )
    if user is not None:
        qa, qb = qa.where(completions.c.user == user), qb.where(events.c.user == user)
    last: dict[str, float] = dict(c.execute(qa).tuples().all())
    last_sel: dict[str, float] = {}
    for u, t, ts in c.execute(qb):
        last[u] = max(last.get(u, t), t)
        if ts is not None:
            last_sel[u] = ts
    active = {w: sum(1 for t in last.values() if t >= s) for w, s in starts.items()}
    engaged = {w: sum(1 for t in last_sel.values() if t >= s) for w, s in starts.items()}
    return active, engaged


def daily(engine: Engine, days: int = 30, *, now: float | None = None) -> list[Row]:
    """One row per UTC day for the last `days` days, oldest first, days without use included (zeros)."""
    from .store import day_of

    now = time.time() if now is None else now
    rep = report(engine, by="day", since=now - days * 86400, now=now, summary=False)
    have = {r.key: r for r in rep.rows}
    out = []
    for i in range(days - 1, -1, -1):
        d = day_of(now - i * 86400)
        out.append(have.get(d, Row(d)))
    return out
