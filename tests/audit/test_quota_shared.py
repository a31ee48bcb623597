"""The daily token budget shared by replicas (audit/quota_shared.py), on SQLite and PostgreSQL:
two replicas cannot both spend a user's last token, and what one counts the other sees."""

from __future__ import annotations

import threading

import pytest

from codemoat.audit.quota import Quotas
from codemoat.db import open_db
from codemoat.errors import RateLimited


@pytest.fixture
def replicas(database_url):
    """Two replicas' quota keepers on one database (each with its own engine, as two processes)."""
    from codemoat.db import make_engine

    engines = [open_db(database_url), make_engine(database_url)]  # migrated once; two pools
    yield [Quotas(tokens_per_day=10, engine=e) for e in engines]
    for e in engines:
        e.dispose()


def test_what_one_replica_counts_the_other_sees(replicas):
    a, b = replicas
    a.check("alice", "tok_a")
    a.add_tokens("alice", "tok_a", 7)
    assert b.used_today(user="alice") == 7 and b.used_today(token_id="tok_a") == 7
    b.check("alice", "tok_b")  # another token of alice's, on the other replica
    b.add_tokens("alice", "tok_b", 3)
    assert a.used_today(user="alice") == 10
    for q in (a, b):
        with pytest.raises(RateLimited, match="this user"):
            q.check("alice", "tok_c")
    a.check("bob", "tok_x")  # others are untouched


def test_the_last_token_goes_to_one_replica_only(replicas):
    """Nine of ten tokens spent; eight requests race on two replicas: exactly one is admitted."""
    a, b = replicas
    a.check("alice", "tok_a")
    a.add_tokens("alice", "tok_a", 9)
    admitted, refused = [], []
    go = threading.Barrier(8)

    def one(q: Quotas) -> None:
        go.wait()
        try:
            q.check("alice", "tok_a")
            admitted.append(q)
        except RateLimited:
            refused.append(q)

    threads = [threading.Thread(target=one, args=(q,)) for q in (a, b) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(admitted) == 1 and len(refused) == 7
    assert a.used_today(user="alice") == 10


def test_a_failed_request_gives_its_token_back(replicas):
    a, b = replicas
    a.check("alice", "tok_a")
    a.add_tokens("alice", "tok_a", 9)
    b.check("alice", "tok_a")  # holds the last token ...
    with pytest.raises(RateLimited):
        a.check("alice", "tok_a")
    b.add_tokens("alice", "tok_a", 0)  # ... and generated nothing: it is given back
    assert a.used_today(user="alice") == 9
    a.check("alice", "tok_a")


def test_a_refusal_reserves_nothing(replicas):
    """The user's budget is spent but a fresh token's is not: the token's reservation is rolled back."""
    a, _ = replicas
    a.check("alice", "tok_a")
    a.add_tokens("alice", "tok_a", 10)
    with pytest.raises(RateLimited, match="this user"):
        a.check("alice", "tok_new")
    assert a.used_today(token_id="tok_new") == 0
