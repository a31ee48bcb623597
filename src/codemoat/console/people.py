"""Disabling a user from the console: the user is marked disabled and every active token of theirs
is revoked in the same transaction (so every request and console session they hold stops at once);
the console creates no token for a disabled user. Enabling clears the mark; tokens stay revoked."""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy import Engine

from ..accounts.store import tokens, users
from ..errors import CodemoatError, NotFound


def set_disabled(engine: Engine, user: str, disabled: bool) -> int:
    """Mark `user` disabled (revoking its active tokens) or enabled; returns how many tokens were revoked."""
    with engine.begin() as c:
        if c.execute(sa.select(users.c.name).where(users.c.name == user)).first() is None:
            raise NotFound(f"no user named {user!r}")
        c.execute(users.update().where(users.c.name == user).values(disabled=disabled))
        if not disabled:
            return 0
        r = c.execute(tokens.update().where(tokens.c.user == user, tokens.c.revoked_at.is_(None)).values(revoked_at=time.time()))
        return int(r.rowcount or 0)


def check_enabled(engine: Engine, user: str | None) -> None:
    """Refuse to create a token for a disabled user."""
    if not user:
        return
    with engine.connect() as c:
        if c.execute(sa.select(users.c.disabled).where(users.c.name == user)).scalar():
            raise CodemoatError(f"user {user!r} is disabled: enable it first")


def disabled_users(engine: Engine) -> set[str]:
    with engine.connect() as c:
        return {r[0] for r in c.execute(sa.select(users.c.name).where(users.c.disabled.is_(True)))}
