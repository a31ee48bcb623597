"""Console sessions on SQLite and PostgreSQL: stored as a hash, ended by sign-out, expiry, token
revocation or expiry, and the token losing its admin scope."""

from __future__ import annotations

import sqlalchemy as sa

from codemoat.accounts import Accounts
from codemoat.accounts.store import tokens
from codemoat.console.sessions import SESSION_SECONDS, Sessions
from codemoat.db import open_db


def test_session_lifecycle(database_url):
    engine = open_db(database_url)
    accounts = Accounts(engine)
    info, secret = accounts.create_token("root", user="root", scopes=("admin",))
    s = Sessions(engine)
    sid, sess = s.create(accounts.authenticate(secret), now=1000.0)
    assert s.get(sid, now=1001.0) == sess and sess.user == "root" and sess.csrf_ok(sess.csrf) and not sess.csrf_ok("x")
    with engine.connect() as c:
        assert sid not in repr(c.execute(sa.text("SELECT * FROM console_sessions")).all())
    assert s.get(sid, now=1000.0 + SESSION_SECONDS) is None  # expired
    assert s.get("not-a-session") is None and s.get(None) is None and s.get("x" * 500) is None
    sid, _ = s.create(accounts.authenticate(secret))
    with engine.begin() as c:
        c.execute(tokens.update().where(tokens.c.id == info.id).values(scopes="complete"))
    assert s.get(sid) is None  # no longer an admin token
    with engine.begin() as c:
        c.execute(tokens.update().where(tokens.c.id == info.id).values(scopes="admin"))
    assert s.get(sid) is not None
    s.end(sid)
    assert s.get(sid) is None  # signed out
    sid, _ = s.create(accounts.authenticate(secret))
    accounts.revoke_token(info.id)
    assert s.get(sid) is None  # revoked
