"""The daily roll-up answers what a scan of the raw tables answers, on random usage, on SQLite and
PostgreSQL: every report grouping, windows starting mid-day, per-user and per-language filters,
latency percentiles, active and engaged users, the cost case's per-hour peak; and migration u002's
backfill rebuilds the same roll-up that writing kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codemoat.db import open_db
from codemoat.usage import BY, UsageStore, report
from codemoat.usage.rollup import bucket, per_hour, rebuild, whole_days
from codemoat.usage.tables import completions, daily, daily_lang, daily_users, events, hourly, latency_daily
from usagehelp import usage

NOW = 1_780_000_000.0  # 2026-05-28 (UTC)
DAY = 86400
USERS = ("ann", "bob", "cy")
PATHS = ("a.py", "b.go", "c.rs", None)


completion_st = st.tuples(
    st.just("c"),
    st.sampled_from(USERS),
    st.floats(0, 6 * DAY),  # how long before NOW
    st.sampled_from(("/v1/completions", "/v1/completions", "/v1/chat/completions")),
    st.sampled_from(PATHS),
    st.sampled_from(("tabby", "openai", "ollama")),
    st.floats(0, 15000),  # latency ms: every bucket width
    st.integers(0, 5000),
    st.text("ab\n", max_size=12),
)
event_st = st.tuples(
    st.just("e"),
    st.sampled_from(USERS),
    st.floats(0, 6 * DAY),
    st.sampled_from(("view", "select", "dismiss", "other")),
    st.integers(0, 40),  # which completion (past the end: an id never handed out)
    st.sampled_from((None, "line", "block")),
)


def _apply(store: UsageStore, ops) -> None:
    n = 0
    for op in ops:
        if op[0] == "c":
            _, user, ago, route, path, proto, lat, pt, text = op
            n += 1
            f = usage(protocol=proto, prompt_tokens=pt, completion_text=text, language=path, completion_id=f"cmpl-{n:024x}")
            store.record(user, route, 200, lat, f, now=NOW - ago)
        else:
            _, user, ago, type_, which, kind = op
            store.record_event(user, type_, completion_id=f"cmpl-{which:024x}", select_kind=kind, now=NOW - ago)


def _wipe(engine) -> None:
    with engine.begin() as c:
        for t in (completions, events, daily, daily_lang, daily_users, latency_daily, hourly):
            c.execute(t.delete())


def _snapshot(engine) -> dict:
    with engine.connect() as c:
        return {
            t.name: sorted(tuple(r) for r in c.execute(sa.select(t)))
            for t in (daily, daily_lang, daily_users, latency_daily, hourly)
        }


def _same(engine, **kw) -> None:
    a = report(engine, now=NOW, **kw).to_dict()
    b = report(engine, now=NOW, rollup=False, **kw).to_dict()
    a.pop("generated_at"), b.pop("generated_at")
    assert a == b, kw


@pytest.fixture
def store(database_url):
    return UsageStore(open_db(database_url))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(st.one_of(completion_st, event_st), max_size=60),
    cut=st.floats(0, 7 * DAY),
    who=st.sampled_from((None, *USERS)),
    lang=st.sampled_from((None, "python", "go", "unknown")),
)
def test_rollup_answers_equal_the_raw_tables(store, ops, cut, who, lang):
    _wipe(store.engine)
    _apply(store, ops)
    since = NOW - cut
    day_start = whole_days(1, since)  # a window of whole days: the roll-up alone answers it
    for by in BY:
        _same(store.engine, by=by)
        _same(store.engine, by=by, since=since)
    _same(store.engine, by="user", since=day_start)
    _same(store.engine, by="day", since=since, user=who, language=lang)
    _same(store.engine, by="language", since=day_start, user=who)
    with store.engine.connect() as c:
        assert per_hour(c, since=since) == per_hour(c, since=since, rollup=False)
        assert per_hour(c, since=day_start) == per_hour(c, since=day_start, rollup=False)
    _oracle(store.engine)
    kept = _snapshot(store.engine)
    with store.engine.begin() as c:
        rebuild(c)
    assert _snapshot(store.engine) == kept


def _oracle(engine) -> None:
    """Per language and in total: completions, users, views and selects counted in Python from the rows."""
    with engine.connect() as c:
        done = c.execute(sa.select(completions.c.language, completions.c.user, completions.c.kind)).all()
        evs = c.execute(sa.select(events.c.language, events.c.type).where(events.c.matched.is_(True))).all()
    want: dict[str, list] = {}
    for lang, user, kind in done:
        w = want.setdefault(lang, [0, set(), 0, 0])
        w[0] += kind == "completion"
        w[1].add(user)
    for lang, type_ in evs:
        w = want.setdefault(lang, [0, set(), 0, 0])
        w[2] += type_ == "view"
        w[3] += type_ == "select"
    rep = report(engine, by="language", now=NOW)
    assert {r.key: (r.completions, r.users, r.views, r.selects) for r in rep.rows} == {
        k: (n, len(u), v, s) for k, (n, u, v, s) in want.items()
    }
    assert rep.total.users == len({u for _, u, _ in done})


def test_a_mid_day_window_counts_the_first_day_from_the_rows(store):
    """since falls mid-day: the part of that day before it is left out (the roll-up alone cannot)."""
    s = store
    day_start = NOW - NOW % DAY
    s.record("ann", "/v1/completions", 200, 10, usage(completion_id=f"cmpl-{1:024x}"), now=day_start + 100)
    s.record("ann", "/v1/completions", 200, 20, usage(completion_id=f"cmpl-{2:024x}"), now=day_start + 5000)
    s.record("bob", "/v1/completions", 200, 30, usage(completion_id=f"cmpl-{3:024x}"), now=day_start + DAY + 10)
    r = report(s.engine, by="user", since=day_start + 1000, now=NOW + DAY)
    assert r.total.completions == 2 and {x.key: x.completions for x in r.rows} == {"ann": 1, "bob": 1}
    assert r.latency_ms["p50"] == 20.0
    with s.engine.connect() as c:
        assert c.execute(sa.select(sa.func.sum(daily.c.completions))).scalar() == 3  # the roll-up holds all three


def test_latency_buckets():
    assert [bucket(x) for x in (-1, 0, 0.99, 999.9, 1000, 1234.5, 9999.9, 10000, 12345.6)] == [
        0,
        0,
        0,
        999,
        1000,
        1230,
        9990,
        10000,
        12300,
    ]


def test_migration_backfills_the_rollup_from_existing_rows(store):
    """Rows written before u002 (the roll-up dropped): upgrading rebuilds the roll-up writing kept."""
    from alembic import command
    from alembic.config import Config

    import codemoat.db as db

    s = store
    _apply(
        s,
        [
            ("c", "ann", 10.0, "/v1/completions", "a.py", "tabby", 80.0, 900, "x\ny"),
            ("c", "bob", DAY + 5, "/v1/chat/completions", None, "openai", 400.0, 300, ""),
            ("e", "ann", 5.0, "view", 1, None),
            ("e", "ann", 4.0, "select", 1, "line"),
            ("e", "bob", 3.0, "select", 1, None),
        ],
    )
    kept = _snapshot(s.engine)
    assert kept["usage_daily"]
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
    cfg.set_main_option("version_locations", " ".join(db.migration_dirs(db.CUSTOMER_BRANCHES)))
    cfg.set_main_option("path_separator", "space")
    with s.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "u001_usage")
    with s.engine.connect() as conn:
        assert "usage_daily" not in sa.inspect(conn).get_table_names()
    with s.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "heads")
    assert _snapshot(s.engine) == kept
