"""Requests without a valid token cannot flood the audit log (issue 14 item 8): per source, the
first in each interval is recorded, the rest are counted into one record; their paths are never
stored."""

from __future__ import annotations

from fastapi.testclient import TestClient

from audit.trustapp import db_bytes, fresh_db, make_app, make_tokens, records, tiny_llm
from codemoat.accounts import Accounts
from codemoat.config import Settings

AWS = "AKIA" + "ZXCVBNMASDFGHJKL"


llm = tiny_llm  # the module's engine (trustapp)


db = fresh_db  # the test's own database engine (trustapp)


def test_unauthenticated_flood_is_one_record_and_one_tally_per_source(db, llm, home):
    accounts = Accounts(db)
    app = make_app(Settings(), accounts, llm)
    tokens = make_tokens(accounts)
    attacker = TestClient(app, client=("203.0.113.9", 4000))
    other = TestClient(app, client=("198.51.100.7", 4000))
    with attacker:
        for i in range(20):
            assert attacker.post("/v1/completions", json={"prompt": "x"}).status_code == 401
            assert attacker.get(f"/{AWS}/{i}", headers={"Authorization": f"Bearer {AWS}"}).status_code == 404
            assert attacker.get("/api/version").status_code == 200  # open, but from no one: tallied too
        assert other.post("/v1/completions", json={"prompt": "x"}).status_code == 401  # another source: its own record
        ok = attacker.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, headers=tokens["alice"])
        assert ok.status_code == 200  # a caller with a token from the same address is recorded as always
        assert len(records(db)) == 3  # sixty requests, not sixty records
        app.state.trust.unauthenticated.interval = 0  # the interval is over: the next one closes the tally
        assert attacker.post("/v1/completions", json={"prompt": "x"}).status_code == 401
    recs = records(db)
    assert [(r["client"], r["status"], r["user"]) for r in recs] == [
        ("203.0.113.9", 401, None),
        ("198.51.100.7", 401, None),
        ("203.0.113.9", 200, "alice"),
        ("203.0.113.9", 401, None),
    ]
    tallies = records(db, "unauthenticated")
    assert [(t["client"], t["detail"]["count"]) for t in tallies] == [("203.0.113.9", 59)]
    detail = tallies[0]["detail"]
    assert detail["statuses"] == {"200": 20, "401": 19, "404": 20}
    assert detail["routes"] == {"/api/version": 20, "/v1/completions": 19, "unmatched": 20}
    assert AWS.encode() not in db_bytes(home)  # neither the path nor the bogus token
    assert app.state.trust.log.verify().ok


def test_tally_is_bounded_and_drained_at_shutdown():
    from codemoat.serve.failures import OVERFLOW, FailureTally

    t = FailureTally(interval=60, max_sources=3)
    first = [t.observe(f"10.0.0.{i}", 401, "/v1/completions", now=100)[0] for i in range(5)]
    assert first == [True, True, True, True, False]  # the fourth source on is the overflow entry "*"
    assert t.observe("10.0.0.9", 404, "unmatched", now=101) == (False, [])
    assert t.observe("10.0.0.0", 401, "/v1/completions", now=102) == (False, [])
    assert sorted(t._open) == ["*", "10.0.0.0", "10.0.0.1", "10.0.0.2"]  # however many addresses call
    alone, ended = t.observe("10.0.0.0", 401, "/v1/completions", now=200)  # the interval is over
    assert sorted((x.source, x.count) for x in ended) == [(OVERFLOW, 2), ("10.0.0.0", 1)]
    assert alone  # a new interval begins with a record of its own
    assert t.drain() == [] and t._open == {}  # nothing counted since
