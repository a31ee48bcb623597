"""The short-lived cache of verified tokens: one lookup per burst, and never a wrong or stale answer."""

import time

import pytest
import sqlalchemy as sa

from codemoat.accounts import Accounts
from codemoat.accounts import store
from codemoat.accounts.store import VERIFIED_TTL, tokens
from codemoat.db import open_db
from codemoat.errors import Unauthorized
from replica import write_elsewhere


@pytest.fixture
def acc(database_url):
    eng = open_db(database_url)
    yield Accounts(eng)
    eng.dispose()


def _lookups(engine) -> list[str]:
    seen: list[str] = []

    def count(conn, cursor, statement, *a) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "tokens" in statement:
            seen.append(statement)

    sa.event.listen(engine, "after_cursor_execute", count)
    return seen


def test_a_burst_costs_one_lookup(acc):
    _, secret = acc.create_token("alice")
    acc.authenticate(secret)  # the first one also writes last_used_at, and is not remembered
    seen = _lookups(acc.engine)
    for _ in range(20):
        assert acc.authenticate(secret).user == "alice"
    assert len(seen) == 1
    assert secret not in repr(acc._verified)  # kept by its hash, never the token


def test_failures_are_never_remembered(acc):
    _, secret = acc.create_token("alice")
    acc.authenticate(secret)
    seen = _lookups(acc.engine)
    for bad in ("cm_wrong", secret[:-1], secret + "x", secret.upper()):
        for _ in range(3):
            with pytest.raises(Unauthorized):
                acc.authenticate(bad)
    assert len(seen) == 12  # every wrong token looked up each time
    assert len(acc._verified) <= 1


def test_changes_through_this_process_take_effect_at_once(acc):
    _, secret = acc.create_token("alice")
    for _ in range(2):
        acc.authenticate(secret)
    acc.revoke_token("alice")
    with pytest.raises(Unauthorized, match="revoked"):
        acc.authenticate(secret)

    _, s2 = acc.create_token("bob")
    acc.add_group("red")
    for _ in range(2):
        acc.authenticate(s2)
    acc.set_groups("bob", ["red"])
    assert "red" in acc.authenticate(s2).groups
    with acc.engine.begin() as c:  # as the console's "disable user" does: SQL on the same engine
        c.execute(tokens.update().where(tokens.c.user == "bob").values(revoked_at=time.time()))
    with pytest.raises(Unauthorized):
        acc.authenticate(s2)

    _, s3 = acc.create_token("carol")
    for _ in range(2):
        acc.authenticate(s3)
    acc.remove_user("carol")
    with pytest.raises(Unauthorized):
        acc.authenticate(s3)


@pytest.mark.parametrize("via", ["request", "keeper"])
def test_a_lookup_between_the_commit_event_and_the_commit_is_not_kept(acc, via):
    """SQLAlchemy's "commit" event fires before the database commits: a lookup in between (a request's, or the
    background keeper's, which runs every 0.25 s: `accounts.fresh`) still reads the token as valid. It must not be
    remembered: a revocation through this process takes effect at once (before the fix it lived on for 0.5 s)."""
    import threading

    _, secret = acc.create_token("alice")
    for _ in range(2):
        acc.authenticate(secret)
    digest = next(iter(acc._verified))
    fired: list[int] = []

    def look_up_meanwhile(conn) -> None:  # registered after the cache's own listener: runs after its forgetting
        if fired:
            return
        fired.append(1)
        if via == "keeper":
            look = lambda: acc.refresh_verified({digest: time.time()})  # noqa: E731
        else:
            look = lambda: acc.authenticate(secret)  # noqa: E731
        t = threading.Thread(target=look)  # another connection, as another request's or the keeper's
        t.start()
        t.join()

    sa.event.listen(acc.engine, "commit", look_up_meanwhile)
    try:
        acc.revoke_token("alice")
    finally:
        sa.event.remove(acc.engine, "commit", look_up_meanwhile)
    assert fired
    with pytest.raises(Unauthorized, match="revoked"):
        acc.authenticate(secret)


def test_a_revocation_elsewhere_takes_effect_within_the_ttl(acc, database_url):
    _, secret = acc.create_token("alice")
    for _ in range(2):
        acc.authenticate(secret)
    write_elsewhere(database_url, tokens.update().values(revoked_at=time.time()))
    time.sleep(VERIFIED_TTL + 0.05)
    with pytest.raises(Unauthorized, match="revoked"):
        acc.authenticate(secret)


def test_expiry_is_checked_on_a_remembered_token(acc, monkeypatch):
    monkeypatch.setattr(store, "VERIFIED_TTL", 30.0)  # remembered for longer than the token lives
    _, secret = acc.create_token("alice", expires_at=time.time() + 1.0)
    for _ in range(2):
        acc.authenticate(secret)
    time.sleep(max(0.0, acc._verified[next(iter(acc._verified))][1] - time.time()) + 0.05)
    with pytest.raises(Unauthorized, match="expired"):
        acc.authenticate(secret)


def test_a_transaction_cut_by_the_database_raises_the_drivers_error(pg_cluster):
    """A connection PostgreSQL drops in the middle of a transaction (a restart, a failover) gives
    the caller the driver's OperationalError, which serve answers with a 503. The cache's rollback
    listener read the dead connection's info, which raised PendingRollbackError instead: a 500, and
    in the audit writer's signing step, records committed for requests then answered 500."""
    url = pg_cluster.new_database()
    eng = open_db(url)
    try:
        Accounts(eng)  # watches the engine's writes
        with pytest.raises(sa.exc.OperationalError):
            with eng.begin() as c:
                pid = c.execute(sa.text("select pg_backend_pid()")).scalar()
                with eng.connect() as other:
                    assert other.execute(sa.text("select pg_terminate_backend(:p)"), {"p": pid}).scalar()
                c.execute(sa.text("select 1"))
        with eng.connect() as c:  # and the pool goes on with a new connection
            assert c.execute(sa.text("select 1")).scalar() == 1
    finally:
        eng.dispose()
        pg_cluster.drop_database(url)
