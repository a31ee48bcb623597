"""The daily roll-up: what the reports read instead of every row.

`usage_daily` holds one row per UTC day x user x language x protocol with sums (completions, chats,
tokens, matched view/select/dismiss events, accepted characters and lines, unmatched and all events),
`usage_daily_lang` and `usage_daily_users` the same sums per day x language x protocol and per day x
user (an unfiltered report reads tens of rows a day from the first, distinct users from the second);
`usage_latency_daily` counts completion latencies per day in buckets; `usage_hourly` counts requests
per hour. `UsageStore` adds to them in the same transaction as the row it writes (an upsert that
adds, atomic on SQLite and PostgreSQL), so the roll-up is never behind; migration u002 backfills it
from the rows already there (`rebuild`).

A report since a time `since` reads whole days from the roll-up (every day after since's day,
today included) and the rows of since's own day at or after `since` from the raw tables (through
their index on day), so its answers equal a scan of the raw tables (tests/usage/test_rollup.py
checks that on random data, on both backends). A `since` at the start of a UTC day (`whole_days`:
what the console, /metrics and the cost case ask for) is answered by the roll-up alone.

Latency percentiles are reported to the bucket (1 ms below 1 s, 10 ms below 10 s, 100 ms above):
the bucket of the completion at the percentile's rank, the same whether read from the histogram or
from the rows (the bucket is monotonic, so ranks are kept).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from .tables import completions, daily, daily_lang, daily_users, events, hourly, latency_daily

DIMS = ("day", "user", "language", "protocol")
LANG_DIMS = ("day", "language", "protocol")
USER_DIMS = ("day", "user")
FACTS = (
    "completions",
    "chats",
    "c_prompt",
    "c_output",
    "h_prompt",
    "h_output",
    "views",
    "selects",
    "dismisses",
    "accepted_chars",
    "accepted_lines",
    "unmatched",
    "events",
)


TABLES = {DIMS: daily, LANG_DIMS: daily_lang, USER_DIMS: daily_users}  # the same sums at three grains


def bucket(ms: float) -> int:
    """The latency bucket (its lower bound in ms) of one completion."""
    i = int(ms) if ms > 0 else 0
    return i if i < 1000 else i // 10 * 10 if i < 10000 else i // 100 * 100


def bucket_sql(col, dialect: str):
    """`bucket` in SQL (SQLite's CAST truncates; PostgreSQL's would round, so floor first)."""
    i = sa.cast(col, sa.Integer) if dialect == "sqlite" else sa.cast(sa.func.floor(col), sa.Integer)
    return sa.case((col <= 0, 0), (i < 1000, i), (i < 10000, i // 10 * 10), else_=i // 100 * 100)


def hour_of(ts: float) -> int:
    return int(ts / 3600)


def hour_sql(col, dialect: str):
    return sa.cast(col / 3600, sa.Integer) if dialect == "sqlite" else sa.cast(sa.func.floor(col / 3600), sa.Integer)


def _day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).date().isoformat()  # "0001-01-01" (strftime's %Y gives "1-01-01")


def _day_start(day: str) -> float:
    return datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp()


def whole_days(n: int, now: float) -> float:
    """The start of the last `n` UTC days, today included: windows the roll-up answers alone."""
    return _day_start(_day_of(now)) - (n - 1) * 86400


def _aligned(since: float) -> bool:
    return since == _day_start(_day_of(since))


# -- writing -------------------------------------------------------------------------------------
_UPSERTS: dict[tuple, Any] = {}
_RAW: dict[int, tuple[Any, str, tuple[str, ...]]] = {}


def execute(c, stmt, params: dict) -> None:
    """`c.execute(stmt, params)` for a statement built once; on SQLite straight on the driver's connection,
    in the same transaction: SQLAlchemy's own execution cost ~4x the statements there (a usage row and its
    roll-ups, every request: 0.18 against 0.04 ms)."""
    if c.dialect.name != "sqlite":
        c.execute(stmt, params)
        return
    raw = _RAW.get(id(stmt))
    if raw is None or raw[0] is not stmt:
        compiled = stmt.compile(dialect=c.dialect)
        raw = _RAW[id(stmt)] = (stmt, str(compiled), tuple(compiled.positiontup))
    c.connection.driver_connection.execute(raw[1], tuple(params[n] for n in raw[2]))


def _upsert(dialect: str, table: sa.Table, keys: tuple[str, ...], adds: tuple[str, ...]):
    """INSERT a row, or add `adds` to the one with these keys: built once, parameters bound per call."""
    k = (dialect, table.name, keys, adds)
    if k not in _UPSERTS:
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        stmt = insert(table).values({n: sa.bindparam(n) for n in (*keys, *adds)})
        _UPSERTS[k] = stmt.on_conflict_do_update(index_elements=list(keys), set_={n: table.c[n] + stmt.excluded[n] for n in adds})
    return _UPSERTS[k]


def _add(c, table: sa.Table, keys: dict, adds: dict) -> None:
    """Add `adds` to the roll-up row with these keys (one atomic statement)."""
    execute(c, _upsert(c.dialect.name, table, tuple(keys), tuple(adds)), {**keys, **adds})


def add_completion(c, row: dict) -> None:
    """Roll up one `usage_completions` row (as inserted), inside the caller's transaction."""
    chat = row["kind"] == "chat"
    pt, ct = row["prompt_tokens"], row["completion_tokens"]
    facts = dict.fromkeys(FACTS, 0)
    facts.update(
        completions=0 if chat else 1,
        chats=1 if chat else 0,
        c_prompt=0 if chat else pt,
        c_output=0 if chat else ct,
        h_prompt=pt if chat else 0,
        h_output=ct if chat else 0,
    )
    _add_all(c, row, facts)
    if not chat:
        _add(c, latency_daily, {"day": row["day"], "bucket": bucket(row["latency_ms"])}, {"n": 1})
    _add(c, hourly, {"hour": hour_of(row["ts"])}, {"n": 1})


def add_event(c, row: dict) -> None:
    """Roll up one `usage_events` row (as inserted), inside the caller's transaction."""
    m, t = bool(row["matched"]), row["type"]
    facts = dict.fromkeys(FACTS, 0)
    facts.update(
        views=int(m and t == "view"),
        selects=int(m and t == "select"),
        dismisses=int(m and t == "dismiss"),
        accepted_chars=row["chars"] if m and t == "select" else 0,
        accepted_lines=row["lines"] if m and t == "select" else 0,
        unmatched=int(not m),
        events=1,
    )
    _add_all(c, row, facts)


def _add_all(c, row: dict, facts: dict) -> None:
    for dims, table in TABLES.items():
        _add(c, table, {k: row[k] for k in dims}, facts)


# -- reading -------------------------------------------------------------------------------------
def _sum(cond, value=1):
    return sa.func.sum(sa.case((cond, value), else_=0))


def _raw_completions(conds: list, dims: tuple[str, ...] = DIMS):
    k, t = completions.c.kind, completions.c
    return (
        sa.select(
            *(t[d] for d in dims),
            _sum(k == "completion").label("completions"),
            _sum(k == "chat").label("chats"),
            _sum(k == "completion", t.prompt_tokens).label("c_prompt"),
            _sum(k == "completion", t.completion_tokens).label("c_output"),
            _sum(k == "chat", t.prompt_tokens).label("h_prompt"),
            _sum(k == "chat", t.completion_tokens).label("h_output"),
            *(sa.literal_column("0").label(f) for f in FACTS[6:]),
        )
        .where(*conds)
        .group_by(*(t[d] for d in dims))
    )


def _raw_events(conds: list, dims: tuple[str, ...] = DIMS):
    t = events.c
    m = t.matched.is_(True)
    sel = sa.and_(m, t.type == "select")
    return (
        sa.select(
            *(t[d] for d in dims),
            *(sa.literal_column("0").label(f) for f in FACTS[:6]),
            _sum(sa.and_(m, t.type == "view")).label("views"),
            _sum(sel).label("selects"),
            _sum(sa.and_(m, t.type == "dismiss")).label("dismisses"),
            _sum(sel, t.chars).label("accepted_chars"),
            _sum(sel, t.lines).label("accepted_lines"),
            _sum(t.matched.is_(False)).label("unmatched"),
            sa.func.count().label("events"),
        )
        .where(*conds)
        .group_by(*(t[d] for d in dims))
    )


def facts(
    *,
    since: float | None = None,
    user: str | None = None,
    language: str | None = None,
    rollup: bool = True,
    dims: tuple[str, ...] = DIMS,
):
    """A subquery with `dims` and FACTS columns, rows to be summed: usage at or after `since`. `dims`
    is one of the roll-up's grains (DIMS, LANG_DIMS, USER_DIMS); a filter needs its column there.

    rollup=False reads the raw tables only (the reference the roll-up is checked against)."""
    table = TABLES[dims]

    def conds(t: sa.Table) -> list:
        out = []
        if user is not None:
            out.append(t.c.user == user)
        if language is not None:
            out.append(t.c.language == language)
        return out

    if not rollup:
        since_c = [completions.c.ts >= since] if since is not None else []
        since_e = [events.c.ts >= since] if since is not None else []
        parts = [_raw_completions(since_c + conds(completions), dims), _raw_events(since_e + conds(events), dims)]
    else:
        whole = sa.select(*(table.c[d] for d in dims), *(table.c[f] for f in FACTS)).where(*conds(table))
        parts = [whole]
        if since is not None and _aligned(since):
            parts[0] = whole.where(table.c.day >= _day_of(since))
        elif since is not None:
            d0 = _day_of(since)
            parts[0] = whole.where(table.c.day > d0)
            parts.append(_raw_completions([completions.c.day == d0, completions.c.ts >= since, *conds(completions)], dims))
            parts.append(_raw_events([events.c.day == d0, events.c.ts >= since, *conds(events)], dims))
    return sa.union_all(*parts).subquery("facts") if len(parts) > 1 else parts[0].subquery("facts")


def latency_buckets(c, *, since: float | None = None, rollup: bool = True) -> list[tuple[int, int]]:
    """[(bucket, count)] of completion latencies at or after `since`, by bucket ascending."""
    t = completions.c
    b = bucket_sql(t.latency_ms, c.dialect.name).label("bucket")
    is_c = t.kind == "completion"
    if not rollup:
        parts = [
            sa.select(b, sa.func.count().label("n")).where(is_c, *([t.ts >= since] if since is not None else [])).group_by(b)
        ]
    else:
        whole = sa.select(latency_daily.c.bucket, latency_daily.c.n)
        parts = [whole]
        if since is not None and _aligned(since):
            parts = [whole.where(latency_daily.c.day >= _day_of(since))]
        elif since is not None:
            d0 = _day_of(since)
            parts = [
                whole.where(latency_daily.c.day > d0),
                sa.select(b, sa.func.count().label("n")).where(is_c, t.day == d0, t.ts >= since).group_by(b),
            ]
    u = sa.union_all(*parts).subquery() if len(parts) > 1 else parts[0].subquery()
    q = sa.select(u.c.bucket, sa.func.sum(u.c.n)).group_by(u.c.bucket).order_by(u.c.bucket)
    return [(int(k), int(n)) for k, n in c.execute(q)]


def percentiles(buckets: list[tuple[int, int]], qs: dict[str, float]) -> dict[str, float | None]:
    """The bucket holding the completion at rank int(q * (n - 1)) (ascending), for each q."""
    n = sum(x for _, x in buckets)
    out: dict[str, float | None] = {}
    for name, q in qs.items():
        if n == 0:
            out[name] = None
            continue
        rank, seen = int(q * (n - 1)), 0
        for k, x in buckets:
            seen += x
            if seen > rank:
                out[name] = float(k)
                break
    return out


def per_hour(c, *, since: float, rollup: bool = True) -> tuple[int | None, float | None]:
    """(busiest hour's requests, mean over hours with traffic) at or after `since`."""
    t = completions.c
    h = hour_sql(t.ts, c.dialect.name).label("hour")
    if not rollup:
        u = sa.select(h, sa.func.count().label("n")).where(t.ts >= since).group_by(h).subquery()
    elif _aligned(since):
        u = sa.select(hourly.c.hour, hourly.c.n).where(hourly.c.hour >= int(since) // 3600).subquery()
    else:
        d0 = _day_of(since)
        after = int(_day_start(d0) + 86400) // 3600
        u = sa.union_all(
            sa.select(hourly.c.hour, hourly.c.n).where(hourly.c.hour >= after),
            sa.select(h, sa.func.count().label("n")).where(t.day == d0, t.ts >= since).group_by(h),
        ).subquery()
    per = sa.select(u.c.hour, sa.func.sum(u.c.n).label("n")).group_by(u.c.hour).subquery()
    peak, mean = c.execute(sa.select(sa.func.max(per.c.n), sa.func.avg(per.c.n))).one()
    return (None if peak is None else int(peak)), (None if mean is None else float(mean))


# -- rebuilding ----------------------------------------------------------------------------------
def rebuild(c) -> None:
    """Recompute the whole roll-up from the raw tables (migration u003's backfill), in `c`'s transaction."""
    for t in (*TABLES.values(), latency_daily, hourly):
        c.execute(t.delete())
    for grain, table in TABLES.items():
        src = facts(rollup=False, dims=grain)
        dims = [src.c[d] for d in grain]
        c.execute(
            table.insert().from_select(
                [*grain, *FACTS], sa.select(*dims, *(sa.func.sum(src.c[f]) for f in FACTS)).group_by(*dims)
            )
        )
    t = completions.c
    b = bucket_sql(t.latency_ms, c.dialect.name)
    c.execute(
        latency_daily.insert().from_select(
            ["day", "bucket", "n"], sa.select(t.day, b, sa.func.count()).where(t.kind == "completion").group_by(t.day, b)
        )
    )
    h = hour_sql(t.ts, c.dialect.name)
    c.execute(hourly.insert().from_select(["hour", "n"], sa.select(h, sa.func.count()).group_by(h)))
