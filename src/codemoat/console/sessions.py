"""Console sessions: an admin-scoped API token is exchanged once for a session cookie.

The cookie holds 32 random bytes; the database keeps only their SHA-256, so a copy of the database
signs nobody in. A session lives `SESSION_SECONDS` at most and dies with sign-out, with the token it
came from (revoked or expired) and with the token losing the admin scope: each request checks.
Every form carries the session's CSRF token (`csrf`), compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import Engine

from ..accounts import Principal
from ..accounts.store import tokens, users

SESSION_SECONDS = 8 * 3600
COOKIE = "codemoat_session"
SIGNIN_COOKIE = "codemoat_signin"  # the sign-in form's double-submit CSRF value (before any session exists)
OIDC_COOKIE = "codemoat_oidc"  # binds an OpenID Connect sign-in to the browser that started it (console/signin.py)

meta = sa.MetaData()
table = sa.Table(
    "console_sessions",
    meta,
    sa.Column("id_hash", sa.String(64), primary_key=True),
    sa.Column("user", sa.String(128)),
    sa.Column("token_id", sa.String(32)),
    sa.Column("csrf", sa.String(64)),
    sa.Column("created_at", sa.Float),
    sa.Column("expires_at", sa.Float),
)


@dataclass(frozen=True)
class Session:
    user: str
    token_id: str
    csrf: str
    expires_at: float

    def principal(self) -> Principal:
        return Principal(self.user, self.token_id, frozenset(), frozenset({"admin"}))

    def csrf_ok(self, value: object) -> bool:
        return isinstance(value, str) and hmac.compare_digest(value.encode(), self.csrf.encode())


def _h(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


class Sessions:
    def __init__(self, engine: Engine):
        self.engine = engine

    def create(self, principal: Principal, now: float | None = None) -> tuple[str, Session]:
        """A new session for an admin principal; returns the cookie value (never stored) and the session."""
        now = time.time() if now is None else now
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        s = Session(principal.user, principal.token_id, csrf, now + SESSION_SECONDS)
        with self.engine.begin() as c:
            c.execute(table.delete().where(table.c.expires_at <= now))  # the expired go on the way
            c.execute(
                table.insert().values(
                    id_hash=_h(sid), user=s.user, token_id=s.token_id, csrf=csrf, created_at=now, expires_at=s.expires_at
                )
            )
        return sid, s

    def get(self, sid: str | None, now: float | None = None) -> Session | None:
        """The live session a cookie names, or None (unknown, expired, its token revoked or no longer admin)."""
        if not sid or len(sid) > 128:
            return None
        now = time.time() if now is None else now
        q = (
            sa.select(table, tokens.c.scopes, tokens.c.revoked_at, tokens.c.expires_at.label("token_expires"), users.c.disabled)
            .select_from(table.join(tokens, tokens.c.id == table.c.token_id).join(users, users.c.name == table.c.user))
            .where(table.c.id_hash == _h(sid))
        )
        with self.engine.connect() as c:
            r = c.execute(q).first()
        if r is None or r.expires_at <= now or r.revoked_at is not None or r.disabled:
            return None
        if r.token_expires is not None and r.token_expires <= now:
            return None
        if "admin" not in r.scopes.split(","):
            return None
        return Session(r.user, r.token_id, r.csrf, r.expires_at)

    def end(self, sid: str | None) -> None:
        if sid:
            with self.engine.begin() as c:
                c.execute(table.delete().where(table.c.id_hash == _h(sid)))
