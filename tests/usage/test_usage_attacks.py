"""An outside review of the usage numbers, as an attacker with a normal token: events that try to
inflate acceptance (a select per choice index, odd choice indexes over HTTP), and languages a client
makes up per request to grow the roll-up without bound."""

from __future__ import annotations

import random

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.db import open_db
from codemoat.engines.holder import ModelHolder
from codemoat.serve.app import create_app
from codemoat.usage import UsageStore, report
from usagehelp import cid, usage

NOW = 1_780_000_000.0  # 2026-05-28 (UTC)


def small(**kw):
    """A three-token Python completion."""
    return usage(**{"prompt_tokens": 10, "completion_tokens": 3, "completion_text": "abc", "language": "python", **kw})


@pytest.fixture
def store(database_url):
    return UsageStore(open_db(database_url))


def test_a_select_per_choice_index_counts_once(store):
    """Every completion this server gives has one choice (index 0): selecting "choice" 0..49 of one
    completion is one select, not 50 (before: acceptance 50.0 and 50x the accepted characters)."""
    s = store
    s.record("ann", "/v1/completions", 200, 10, small(completion_id=cid(1)), now=NOW)
    s.record("ann", "/v1/completions", 200, 10, small(completion_id=cid(2)), now=NOW)
    assert s.record_event("ann", "view", completion_id=cid(1), choice_index=0, now=NOW)
    assert s.record_event("ann", "view", completion_id=cid(2), choice_index=0, now=NOW)
    assert s.record_event("ann", "select", completion_id=cid(1), choice_index=0, now=NOW)
    for i in range(1, 50):
        assert not s.record_event("ann", "select", completion_id=cid(1), choice_index=i, now=NOW)
        assert not s.record_event("ann", "view", completion_id=cid(2), choice_index=i, now=NOW)
    for rollup in (True, False):  # the roll-up and the raw rows agree
        t = report(store.engine, by="user", now=NOW, rollup=rollup).total
        assert (t.views, t.selects, t.acceptance, t.accepted_chars) == (2, 1, 0.5, 3)


def test_made_up_languages_do_not_grow_the_rollup(store):
    """A client sending a new "language" (a path trick, 10 kB, control characters, HTML) per request
    adds no roll-up rows: languages come from a fixed set, the rest is "unknown"."""
    s, rnd = store, random.Random(7)
    words = ["../../etc/passwd", "x" * 10_000, "py\x00thon", "\x1b[31mred", "<img src=x onerror=alert(1)>", "a.py/../b"]
    words += [f"lang{rnd.getrandbits(64):x}" for _ in range(60)]
    for i, w in enumerate(words):
        s.record("ann", "/v1/completions", 200, 10, small(completion_id=cid(100 + i), language=w), now=NOW)
    with s.engine.connect() as c:
        langs = {r[0] for r in c.execute(sa.text("SELECT DISTINCT language FROM usage_daily"))}
        n = c.execute(sa.text("SELECT COUNT(*) FROM usage_daily")).scalar()
    assert langs == {"unknown"} and n == 1


@pytest.fixture
def served(home):
    engine = open_db(f"sqlite:///{home / 'codemoat.db'}")
    accounts = Accounts(engine)
    _, ann = accounts.create_token("ann", user="ann", scopes=("complete",))
    with TestClient(create_app(Settings(), holder=ModelHolder("tiny"), accounts=accounts)) as c:
        yield c, engine, {"Authorization": f"Bearer {ann}"}


def test_odd_choice_indexes_over_http_count_one_select(served):
    """POST /v1/events with a list of thousands of indexes, a huge, negative, boolean or string index:
    each answered 200 (Tabby's agent ignores the body) and, together, one select of ann's completion."""
    c, engine, ann = served
    UsageStore(engine).record("ann", "/v1/completions", 200, 10, small(completion_id=cid(7)), now=NOW)
    odd = [0, list(range(5000)), 10**30, -1, True, "3", 1023, 1024, None, {"$gt": 0}]
    for idx in odd:
        r = c.post("/v1/events", json={"type": "select", "completion_id": cid(7), "choice_index": idx}, headers=ann)
        assert r.status_code == 200, (idx, r.text)
    r = c.post("/v1/events", json={"type": "view", "completion_id": cid(7)}, headers=ann)
    assert r.status_code == 200
    t = report(engine, by="user", now=NOW).total
    assert (t.views, t.selects, t.acceptance) == (1, 1, 1.0)


def test_a_select_kind_that_is_not_a_string_is_ignored_and_the_select_kept(served):
    """Was (an outside fuzzer): `select_kind` as a list or an object was looked up in the set of known kinds
    (`TypeError: unhashable`): the audit writer's batch rolled back, a traceback went to the log and the select was
    lost. Now a kind that is not one of Tabby's strings is no kind: each select counts. The negative: "line" still
    counts only the first line."""
    c, engine, ann = served
    odd = [["line"], {"line": 1}, 5, True, None]
    for i, kind in enumerate([*odd, "line"]):
        UsageStore(engine).record(
            "ann", "/v1/completions", 200, 10, small(completion_id=cid(40 + i), completion_text="ab\ncd"), now=NOW
        )
        for t in ("view", "select"):
            body = {"type": t, "completion_id": cid(40 + i), **({"select_kind": kind} if t == "select" else {})}
            r = c.post("/v1/events", json=body, headers=ann)
            assert r.status_code == 200, (kind, r.text)
    with engine.connect() as conn:
        kinds = [r[0] for r in conn.execute(sa.text("SELECT select_kind FROM usage_events WHERE type = 'select' ORDER BY id"))]
    assert kinds == [None] * len(odd) + ["line"]


def test_simultaneous_selects_of_one_completion_count_once(store):
    """Eight editors' worth of the same select at the same moment (threads on one barrier): one select,
    on both backends (before, on PostgreSQL, each transaction saw no earlier select and all counted)."""
    import threading

    s = store
    s.record("ann", "/v1/completions", 200, 10, small(completion_id=cid(3)), now=NOW)
    assert s.record_event("ann", "view", completion_id=cid(3), now=NOW)
    gate = threading.Barrier(8)

    def go():
        gate.wait()
        try:
            s.record_event("ann", "select", completion_id=cid(3), now=NOW)
        except Exception:  # a writer that lost the race may be refused; it must not count
            pass

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t = report(s.engine, by="user", now=NOW).total
    assert (t.views, t.selects, t.acceptance) == (1, 1, 1.0)


def test_odd_since_values_are_one_line_errors_or_empty_reports(store):
    """`usage report --since` with a date at either end of the calendar, zero, a newline, or words:
    a report (empty where nothing is that new) or a one-line CodemoatError, never a traceback."""
    from codemoat.audit.rows import parse_since
    from codemoat.errors import CodemoatError

    s = store
    s.record("ann", "/v1/completions", 200, 10, small(completion_id=cid(5)), now=NOW)
    for text in ("9999-12-31", "0001-01-01", "0d", "7d\n", "1970-01-01T00:00:00+00:00", "2026-05-28T12:00:00"):
        rep = report(s.engine, by="day", since=parse_since(text), now=NOW)
        assert rep.total.completions in (0, 1), text
    for text in ("99999999999d", "-5d", "nan", "2026-13-40", "'; DROP TABLE usage_events; --"):
        with pytest.raises(CodemoatError) as e:
            report(s.engine, by="day", since=parse_since(text), now=NOW)
        assert "\n" not in str(e.value) and "Traceback" not in str(e.value), text[:20]


def test_selects_without_views_cannot_push_acceptance_past_what_was_shown(store):
    """A select for a completion no view was reported for counts as a view of it too (an editor shows
    a completion before its user takes it), so selects never outnumber views, in a user's row or in the
    total. Before: mallory's 20 selects and no views took the total from 3 of 10 (30 %) to 23 of 10
    (230 %), and her own row had 20 selects of nothing shown. A view reported after its select is
    then the repeat it is; views and selects of honest clients count as before."""
    s = store
    for i in range(10):  # ann: ten completions shown, three taken
        s.record("ann", "/v1/completions", 200, 10, small(completion_id=cid(i)), now=NOW)
        assert s.record_event("ann", "view", completion_id=cid(i), now=NOW)
        if i < 3:
            assert s.record_event("ann", "select", completion_id=cid(i), now=NOW)
    for i in range(100, 120):  # mallory: twenty completions, each "selected", none reported shown
        s.record("mallory", "/v1/completions", 200, 10, small(completion_id=cid(i)), now=NOW)
        assert s.record_event("mallory", "select", completion_id=cid(i), now=NOW)
    assert not s.record_event("mallory", "view", completion_id=cid(100), now=NOW)  # shown already, by its select
    for rollup in (True, False):  # the roll-up and the raw rows agree
        rep = report(s.engine, by="user", now=NOW, rollup=rollup)
        rows = {r.key: r for r in rep.rows}
        assert (rows["ann"].views, rows["ann"].selects) == (10, 3)
        assert (rows["mallory"].views, rows["mallory"].selects, rows["mallory"].acceptance) == (20, 20, 1.0)
        assert (rep.total.views, rep.total.selects) == (30, 23) and rep.total.acceptance <= 1.0
        assert rows["mallory"].accepted_chars == 20 * 3  # what was taken is unchanged
