"""Tokens in use stay verified while their editors pause (`accounts.fresh`): the request after a pause does not
look its token up, and a token revoked, or whose user was disabled, elsewhere is still refused within
`VERIFIED_TTL`, as without the keeper."""

import threading
import time

import pytest
import sqlalchemy as sa

from codemoat.accounts import Accounts
from codemoat.accounts import fresh
from codemoat.accounts.store import VERIFIED_TTL, tokens, users
from codemoat.db import open_db
from codemoat.errors import Unauthorized
from replica import write_elsewhere
from waiting import wait_for


@pytest.fixture
def acc(database_url):
    eng = open_db(database_url)
    a = Accounts(eng)
    a.keep_fresh()
    yield a
    a.keeper.stop()
    eng.dispose()


def _lookups_here(engine) -> list[str]:
    """The token lookups made on this thread (a request's), not on the keeper's."""
    me, seen = threading.get_ident(), []

    def count(conn, cursor, statement, *a) -> None:
        if threading.get_ident() == me and statement.lstrip().upper().startswith("SELECT") and "tokens" in statement:
            seen.append(statement)

    sa.event.listen(engine, "after_cursor_execute", count)
    return seen


def test_the_request_after_a_pause_does_not_look_its_token_up(acc):
    _, secret = acc.create_token("alice")
    acc.authenticate(secret)
    seen = _lookups_here(acc.engine)
    for _ in range(3):
        time.sleep(VERIFIED_TTL * 2)  # an editor's pause, past the TTL
        assert acc.authenticate(secret).user == "alice"
    assert seen == []


def test_a_revocation_or_a_disabled_user_elsewhere_is_refused_within_the_ttl(acc, database_url):
    """The attacker's case: the keeper must not keep a token alive past the bound. A request every 50 ms keeps
    it in use while another replica revokes it (and, for bob, disables the user)."""
    _, alice = acc.create_token("alice")
    _, bob = acc.create_token("bob")
    for who, change in (
        (alice, tokens.update().where(tokens.c.user == "alice").values(revoked_at=time.time())),
        (bob, users.update().where(users.c.name == "bob").values(disabled=True)),
    ):
        acc.authenticate(who)
        time.sleep(fresh.EVERY_S * 3)  # the keeper has looked it up again since
        write_elsewhere(database_url, change)
        changed = time.time()
        while time.time() < changed + VERIFIED_TTL + 0.05:
            try:
                acc.authenticate(who)
            except Unauthorized:
                break
            time.sleep(0.05)
        with pytest.raises(Unauthorized, match="revoked|disabled"):
            acc.authenticate(who)


def test_last_use_is_still_written_while_the_keeper_keeps_the_token(acc):
    info, secret = acc.create_token("alice")
    acc.authenticate(secret)
    acc._last_used[info.id] = 0.0  # as if its last write was more than a minute ago
    before = time.time()
    acc.authenticate(secret)  # remembered: no lookup, no write on this path
    after = time.time()

    def written() -> float | None:
        return next(t for t in acc.list_tokens() if t.id == info.id).last_used_at

    assert wait_for(lambda: (written() or 0) >= before - 0.001)  # by the keeper's next round
    assert written() <= after + 0.001  # the real last use, not when the keeper wrote it
    seen = _lookups_here(acc.engine)
    time.sleep(VERIFIED_TTL * 2)
    acc.authenticate(secret)
    assert seen == []  # its write forgot the cache; the keeper put the token back


def test_an_idle_keeper_stops(acc, monkeypatch):
    monkeypatch.setattr(fresh, "ACTIVE_S", 1.0)  # a second: the assert below may run late on a loaded machine
    _, secret = acc.create_token("alice")
    acc.authenticate(secret)
    assert acc.keeper._thread is not None
    assert wait_for(lambda: acc.keeper._thread is None)  # idle past ACTIVE_S: it ended (a loaded CI may be late)
    acc.authenticate(secret)  # a later use starts it again
    assert acc.keeper._thread is not None


def test_a_keeper_that_stalls_lets_its_tokens_expire_within_the_ttl(acc, database_url):
    """Each lookup of the keeper's counts for `VERIFIED_TTL` from before it, not from when it was stored: when
    its thread stops (a slow or hung database), a token revoked elsewhere is refused within the TTL."""
    _, secret = acc.create_token("alice")
    acc.authenticate(secret)
    time.sleep(fresh.EVERY_S * 3)
    acc.keeper.stop()
    time.sleep(fresh.EVERY_S * 2)  # its last round is over
    write_elsewhere(database_url, tokens.update().values(revoked_at=time.time()))
    time.sleep(VERIFIED_TTL + 0.05)
    with pytest.raises(Unauthorized, match="revoked"):
        acc.authenticate(secret)


def test_the_keepers_own_last_use_write_does_not_stop_it_remembering(database_url):
    """`refresh_verified` discounts the forgetting its own last-use write causes (one per statement, commit and the
    connection's return to the pool), and remembers the token in that same round."""
    eng = open_db(database_url)
    try:
        a = Accounts(eng)  # no keeper thread: the round is called here
        info, secret = a.create_token("alice")
        for _ in range(2):  # the first writes its last use, and is not remembered
            a.authenticate(secret)
        digest = next(iter(a._verified))
        a._verified.clear()
        a._last_used[info.id] = 0.0  # due for its once-a-minute write
        a.refresh_verified({digest: time.time()})
        assert a._last_used[info.id] > 0.0 and digest in a._verified
    finally:
        eng.dispose()
