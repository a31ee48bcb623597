"""Usage persisted and aggregated in SQL, on SQLite and PostgreSQL: numbers worked out by hand."""

from __future__ import annotations


import pytest

from codemoat.accounts import Accounts
from codemoat.db import open_db
from codemoat.errors import CodemoatError
from codemoat.usage import UsageStore, daily, report
from usagehelp import cid, usage

NOW = 1_780_000_000.0  # 2026-05-28 (UTC)
DAY = 86400


@pytest.fixture
def store(database_url):
    return UsageStore(open_db(database_url))


def test_acceptance_by_language_user_day_and_group(store, database_url):
    s = store
    Accounts(s.engine).add_user("ann", ["web"])
    Accounts(s.engine).add_user("bob", ["web", "data"])
    # ann: three python completions, two viewed, one selected (2 lines, 11 chars), one dismissed
    s.record(
        "ann", "/v1/completions", 200, 50, usage(completion_id=cid(1), completion_text="x = 1\ny = 2", language="a/b.py"), now=NOW
    )
    s.record("ann", "/v1/completions", 200, 70, usage(completion_id=cid(2), completion_text="pass", language="python"), now=NOW)
    s.record("ann", "/v1/completions", 200, 90, usage(completion_id=cid(3), completion_text="z", language="python"), now=NOW)
    for c in (1, 2):
        assert s.record_event("ann", "view", completion_id=cid(c), choice_index=0, now=NOW)
    assert s.record_event("ann", "select", completion_id=cid(1), choice_index=0, now=NOW)
    assert s.record_event("ann", "dismiss", completion_id=cid(2), choice_index=0, now=NOW)
    # bob, the day before: one go completion, viewed and selected by line (first line: 7 chars), one chat
    s.record(
        "bob",
        "/v1/completions",
        200,
        30,
        usage(completion_id=cid(4), completion_text="return\nnil }", language="go"),
        now=NOW - DAY - 60,
    )
    s.record(
        "bob",
        "/v1/chat/completions",
        200,
        400,
        usage(protocol="openai", prompt_tokens=300, completion_tokens=50),
        now=NOW - DAY - 60,
    )
    s.record_event("bob", "view", completion_id=cid(4), now=NOW - DAY - 60)
    s.record_event("bob", "select", completion_id=cid(4), select_kind="line", now=NOW - DAY - 60)
    # not usage: a failed completion, a route that generates nothing
    assert s.record("ann", "/v1/completions", 500, 5, usage(), now=NOW) is None
    assert s.record("ann", "/v1/models", 200, 1, usage(), now=NOW) is None

    rep = report(s.engine, by="language", now=NOW)
    rows = {r.key: r for r in rep.rows}
    assert (rows["python"].completions, rows["python"].views, rows["python"].selects, rows["python"].dismisses) == (3, 2, 1, 1)
    assert rows["python"].acceptance == 0.5 and (rows["python"].accepted_chars, rows["python"].accepted_lines) == (11, 2)
    assert (rows["go"].views, rows["go"].selects, rows["go"].accepted_chars, rows["go"].accepted_lines) == (1, 1, 6, 1)
    assert rows["unknown"].chats == 1  # the chat named no file
    t = rep.total
    assert (t.completions, t.chats, t.views, t.selects, t.users) == (4, 1, 3, 2, 2)
    assert t.prompt_tokens == 4 * 100 + 300 and t.completion_tokens == 4 * 10 + 50
    assert rep.latency_ms["p50"] == 50.0 and rep.latency_ms["p95"] == 70.0  # of 30, 50, 70, 90: ranks 1 and 2
    assert rep.active_users == {"1d": 1, "7d": 2, "28d": 2} and rep.engaged_users == {"1d": 1, "7d": 2, "28d": 2}

    by_day = report(s.engine, by="day", now=NOW).rows
    assert [r.key for r in by_day] == ["2026-05-28", "2026-05-27"]
    assert by_day[0].acceptance == 0.5 and by_day[1].acceptance == 1.0
    by_user = {r.key: r for r in report(s.engine, by="user", now=NOW).rows}
    assert by_user["ann"].completions == 3 and by_user["bob"].chats == 1
    by_group = {r.key: r for r in report(s.engine, by="group", now=NOW).rows}
    assert by_group["web"].completions == 4 and by_group["data"].completions == 1 and by_group["data"].selects == 1
    since = report(s.engine, by="day", since=NOW - 3600, now=NOW)
    assert since.total.completions == 3 and since.total.chats == 0
    series = daily(s.engine, 3, now=NOW)
    assert [r.key for r in series] == ["2026-05-26", "2026-05-27", "2026-05-28"] and series[0].completions == 0


def test_events_cannot_inflate_acceptance(store):
    """Replayed selects count once; a select naming another user's completion, or an id this
    server never handed out, is not tied to any completion and stays out of the rate."""
    s = store
    s.record("ann", "/v1/completions", 200, 10, usage(completion_id=cid(9), completion_text="abc"), now=NOW)
    assert s.record_event("ann", "view", completion_id=cid(9), now=NOW)
    assert s.record_event("ann", "select", completion_id=cid(9), now=NOW)
    assert not s.record_event("ann", "select", completion_id=cid(9), now=NOW)  # the replay
    s.record_event("mallory", "select", completion_id=cid(9), now=NOW)  # not mallory's completion
    s.record_event("mallory", "view", completion_id="<script>alert(1)</script>", now=NOW)
    s.record_event("mallory", "select", completion_id="cmpl-" + "0" * 23 + "g", now=NOW)
    rep = report(s.engine, by="user", now=NOW)
    assert (rep.total.views, rep.total.selects, rep.total.acceptance) == (1, 1, 1.0)
    assert rep.unmatched_events == 3
    assert "mallory" not in {r.key for r in rep.rows}
    with s.engine.connect() as c:
        import sqlalchemy as sa

        ids = {r[0] for r in c.execute(sa.text("SELECT completion_id FROM usage_events"))}
    assert ids == {cid(9), None}  # a caller's text is never stored


def test_no_text_and_languages_from_a_fixed_set(store):
    s = store
    s.record("ann", "/v1/completions", 200, 10, usage(completion_text="SECRET_TEXT", language="<b>evil</b>"), now=NOW)
    s.record("ann", "/api/generate", 200, 10, usage(protocol="ollama", completion_text="y", language="src/App.TSX"), now=NOW)
    with s.engine.connect() as c:
        import sqlalchemy as sa

        rows = [tuple(r) for r in c.execute(sa.text("SELECT * FROM usage_completions"))]
    assert "SECRET_TEXT" not in repr(rows) and "evil" not in repr(rows)
    assert {r.key for r in report(s.engine, by="language", now=NOW).rows} == {"unknown", "typescript"}
    with pytest.raises(CodemoatError, match="cannot group usage by"):
        report(s.engine, by="'; DROP TABLE usage_events; --")
