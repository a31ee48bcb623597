"""Accounts in SQL (SQLite by default, PostgreSQL for replicas).

Tokens are 256-bit random strings shown once; only their SHA-256 is stored (a fast hash is
right for high-entropy secrets: there is nothing to brute-force). Every user is implicitly in
the group `everyone`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
import weakref
from typing import Any
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import Engine

from ..errors import CodemoatError, NotFound, Unauthorized
from ..names import RULE, valid_name

EVERYONE = "everyone"
ALL_SCOPES = ("complete", "chat", "admin", "metrics")  # metrics: a scraper's token, /metrics only
DEFAULT_SCOPES = ("complete", "chat")
TOKEN_PREFIX = "cm_"

meta = sa.MetaData()
users = sa.Table(
    "users",
    meta,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("created_at", sa.Float),
    sa.Column("disabled", sa.Boolean),
)
groups = sa.Table("groups", meta, sa.Column("name", sa.String(128), primary_key=True), sa.Column("created_at", sa.Float))
memberships = sa.Table(
    "memberships", meta, sa.Column("user", sa.String(128), primary_key=True), sa.Column("group", sa.String(128), primary_key=True)
)
tokens = sa.Table(
    "tokens",
    meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(128)),
    sa.Column("user", sa.String(128)),
    sa.Column("hash", sa.String(64)),
    sa.Column("scopes", sa.String(256)),
    sa.Column("created_at", sa.Float),
    sa.Column("expires_at", sa.Float),
    sa.Column("revoked_at", sa.Float),
    sa.Column("last_used_at", sa.Float),
)


@dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    user: str
    token_id: str
    groups: frozenset[str]
    scopes: frozenset[str]

    def can(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


@dataclass(frozen=True)
class TokenInfo:
    id: str
    name: str
    user: str
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > time.time())


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_name(kind: str, name: str) -> str:
    if not valid_name(name):
        raise CodemoatError(f"invalid {kind} name {name!r}: {RULE}")
    return name


class Accounts:
    """Users, groups and tokens over one SQLAlchemy engine (migrated by `codemoat.db.open_db`)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._last_used: dict[str, float] = {}
        # verified tokens, by their SHA-256 (never the token): hash -> (principal, expires_at, cached until)
        self._verified: dict[str, tuple[Principal, float | None, float]] = {}
        self._writes = _watch_writes(engine, self._verified)
        self.keeper: Any = None  # `keep_fresh`

    def keep_fresh(self) -> None:
        """Keep recently used tokens verified in the background (`accounts.fresh`): `codemoat serve` only."""
        if self.keeper is None:
            from .fresh import TokenKeeper

            self.keeper = TokenKeeper(self)

    # -- users and groups -------------------------------------------------
    def add_user(self, name: str, groups_: list[str] | tuple[str, ...] = ()) -> None:
        _check_name("user", name)
        with self.engine.begin() as c:
            if c.execute(sa.select(users.c.name).where(users.c.name == name)).first():
                raise CodemoatError(f"user {name!r} already exists")
            c.execute(users.insert().values(name=name, created_at=time.time(), disabled=False))
            self._set_groups(c, name, groups_)

    def ensure_user(self, name: str) -> None:
        if "\x00" in name:  # refused as a name before PostgreSQL is sent it (DataError: a 500, was)
            _check_name("user", name)
        with self.engine.begin() as c:
            if not c.execute(sa.select(users.c.name).where(users.c.name == name)).first():
                _check_name("user", name)
                c.execute(users.insert().values(name=name, created_at=time.time(), disabled=False))

    def set_groups(self, user: str, groups_: list[str] | tuple[str, ...]) -> None:
        with self.engine.begin() as c:
            self._require_user(c, user)
            c.execute(memberships.delete().where(memberships.c.user == user))
            self._set_groups(c, user, groups_)

    def _set_groups(self, c, user: str, groups_) -> None:
        for g in dict.fromkeys(x.strip() for x in groups_ if x.strip()):
            _check_name("group", g)
            if not c.execute(sa.select(groups.c.name).where(groups.c.name == g)).first():
                c.execute(groups.insert().values(name=g, created_at=time.time()))
            c.execute(memberships.insert().values(user=user, group=g))

    def _require_user(self, c, user: str) -> None:
        # a NUL names no user, and PostgreSQL refuses one in any text it is sent (DataError: a 500, was)
        if "\x00" in user or not c.execute(sa.select(users.c.name).where(users.c.name == user)).first():
            raise NotFound(f"no user named {user!r}")

    def remove_user(self, name: str) -> None:
        with self.engine.begin() as c:
            self._require_user(c, name)
            c.execute(tokens.delete().where(tokens.c.user == name))
            c.execute(memberships.delete().where(memberships.c.user == name))
            c.execute(users.delete().where(users.c.name == name))

    def list_users(self) -> list[dict]:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(users).order_by(users.c.name)).all()
            mem = c.execute(sa.select(memberships)).all()
        by_user: dict[str, list[str]] = {}
        for m in mem:
            by_user.setdefault(m.user, []).append(m.group)
        return [{"name": r.name, "groups": sorted(by_user.get(r.name, [])), "created_at": r.created_at} for r in rows]

    def groups_of(self, user: str) -> frozenset[str]:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(memberships.c.group).where(memberships.c.user == user)).all()
        return frozenset([EVERYONE, *(r.group for r in rows)])

    def add_group(self, name: str) -> None:
        _check_name("group", name)
        with self.engine.begin() as c:
            if c.execute(sa.select(groups.c.name).where(groups.c.name == name)).first():
                raise CodemoatError(f"group {name!r} already exists")
            c.execute(groups.insert().values(name=name, created_at=time.time()))

    def remove_group(self, name: str) -> None:
        if name == EVERYONE:
            raise CodemoatError(f"the group {EVERYONE!r} cannot be removed: every user is in it")
        with self.engine.begin() as c:
            if not c.execute(sa.select(groups.c.name).where(groups.c.name == name)).first():
                raise NotFound(f"no group named {name!r}")
            c.execute(memberships.delete().where(memberships.c.group == name))
            c.execute(groups.delete().where(groups.c.name == name))

    def list_groups(self) -> list[dict]:
        with self.engine.connect() as c:
            gs = c.execute(sa.select(groups.c.name).order_by(groups.c.name)).all()
            mem = c.execute(sa.select(memberships)).all()
        members: dict[str, list[str]] = {}
        for m in mem:
            members.setdefault(m.group, []).append(m.user)
        return [{"name": g.name, "members": sorted(members.get(g.name, []))} for g in gs]

    # -- tokens -------------------------------------------------------------
    def create_token(
        self,
        name: str,
        user: str | None = None,
        scopes: tuple[str, ...] | list[str] = DEFAULT_SCOPES,
        expires_at: float | None = None,
    ) -> tuple[TokenInfo, str]:
        """A new token for `user` (created if missing; default: a user named like the token).
        Returns its info and the secret, which is never stored and cannot be shown again."""
        _check_name("token", name)
        user = user or name
        bad = [s for s in scopes if s not in ALL_SCOPES]
        if bad or not scopes:
            raise CodemoatError(f"unknown scope(s) {bad or scopes}: choose from {', '.join(ALL_SCOPES)}")
        if expires_at is not None and expires_at <= time.time():
            raise CodemoatError("token expiry must be in the future")
        self.ensure_user(user)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        tid = "tok_" + secrets.token_hex(6)
        now = time.time()
        with self.engine.begin() as c:
            c.execute(
                tokens.insert().values(
                    id=tid,
                    name=name,
                    user=user,
                    hash=_hash(secret),
                    scopes=",".join(scopes),
                    created_at=now,
                    expires_at=expires_at,
                )
            )
        return TokenInfo(tid, name, user, tuple(scopes), now, expires_at, None, None), secret

    def list_tokens(self) -> list[TokenInfo]:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(tokens).order_by(tokens.c.created_at)).all()
        return [self._info(r) for r in rows]

    @staticmethod
    def _info(r) -> TokenInfo:
        return TokenInfo(
            r.id, r.name, r.user, tuple(r.scopes.split(",")), r.created_at, r.expires_at, r.revoked_at, r.last_used_at
        )

    def revoke_token(self, id_or_name: str, *, by_id: bool = False) -> TokenInfo:
        """Revoke the active token with this id, or (unless `by_id`: the console's button names an id) this name."""
        which = tokens.c.id == id_or_name if by_id else sa.or_(tokens.c.id == id_or_name, tokens.c.name == id_or_name)
        with self.engine.begin() as c:
            rows = c.execute(sa.select(tokens).where(which, tokens.c.revoked_at.is_(None))).all()
            if not rows:
                raise NotFound(
                    f"no active token with id {id_or_name[:100]!r}"
                    if by_id
                    else f"no active token with id or name {id_or_name!r}"
                )
            # an id names one token whatever others are called: a token's name is its maker's choice (a developer
            # signing in through the directory picks it), and one named like another's id shielded that token
            rows = [r for r in rows if r.id == id_or_name] or rows
            if len(rows) > 1:
                raise CodemoatError(f"{len(rows)} active tokens are named {id_or_name!r}: revoke by id")
            c.execute(tokens.update().where(tokens.c.id == rows[0].id).values(revoked_at=time.time()))
        return self._info(rows[0])

    def authenticate(self, secret: str | None) -> Principal:
        """The principal a bearer token stands for, or `Unauthorized`.

        A verified token is remembered for `VERIFIED_TTL` seconds (by its hash), so that a burst of
        requests costs one lookup; a change to tokens, users or memberships through this process's
        engine forgets them all at once, and one made elsewhere (another replica, the CLI) takes
        effect within the TTL. Failures are never remembered."""
        if not secret:
            raise Unauthorized("missing API token: send 'Authorization: Bearer <token>'")
        digest = _hash(secret)
        now = time.time()
        hit = self._verified.get(digest)
        if hit is not None and now < hit[2] and (hit[1] is None or hit[1] > now):
            if self.keeper is not None:
                self.keeper.touch(digest, now)
            return hit[0]
        generation = self._writes.generation
        with self.engine.connect() as c:
            q = sa.select(tokens, users.c.disabled).select_from(tokens.outerjoin(users, users.c.name == tokens.c.user))
            r = c.execute(q.where(tokens.c.hash == digest)).first()
        why = _refusal(r, now)
        if why is not None:
            raise Unauthorized(why)
        if self._last_used_now(r.id, now):
            generation = -1  # that write forgets the cache: remembered from the next lookup on
        principal = Principal(r.user, r.id, self.groups_of(r.user), frozenset(r.scopes.split(",")))
        with self._writes.lock:  # no write's forgetting between the check and the remembering (as refresh_verified)
            if self._writes.generation == generation:  # no write to accounts while we read: safe to remember
                if len(self._verified) >= _VERIFIED_MAX:
                    self._verified.clear()
                self._verified[digest] = (principal, r.expires_at, now + VERIFIED_TTL)
        if self.keeper is not None:
            self.keeper.touch(digest, now)
        return principal

    def _last_used_now(self, token_id: str, when: float) -> bool:
        """Write the token's last use, at most once a minute per token (off the hot path's common case)."""
        if when - self._last_used.get(token_id, 0) <= 60:
            return False
        self._last_used[token_id] = when
        with self.engine.begin() as c:
            c.execute(tokens.update().where(tokens.c.id == token_id).values(last_used_at=when))
        return True

    def refresh_verified(self, used: dict[str, float]) -> None:
        """Look the tokens of hashes `used` (each with its last use) up again and remember each that still
        authenticates for `VERIFIED_TTL` from before this lookup; forget the others, so that their next request
        looks them up and is refused with the reason. `fresh.TokenKeeper`'s thread calls it."""
        now = time.time()  # before the lookup: a change after it is seen by the next round, within VERIFIED_TTL
        generation = self._writes.generation
        with self.engine.connect() as c:
            q = sa.select(tokens, users.c.disabled).select_from(tokens.outerjoin(users, users.c.name == tokens.c.user))
            rows = [r for r in c.execute(q.where(tokens.c.hash.in_(list(used)))) if _refusal(r, now) is None]
            names = sorted({r.user for r in rows})
            member = c.execute(sa.select(memberships).where(memberships.c.user.in_(names))).all() if names else []
        groups_: dict[str, list[str]] = {}
        for m in member:
            groups_.setdefault(m.user, []).append(m.group)
        fresh = {
            r.hash: (
                Principal(r.user, r.id, frozenset([EVERYONE, *groups_.get(r.user, ())]), frozenset(r.scopes.split(","))),
                r.expires_at,
                now + VERIFIED_TTL,
            )
            for r in rows
        }
        if self._writes.generation != generation:  # a write to accounts while we read: leave it to the request path
            return
        for r in rows:  # (a write forgets the cache: these are put back below, if no other write came meanwhile)
            if self._last_used_now(r.id, used[r.hash]):
                generation += 3  # its statement, its commit and its connection's return (`_Writes`)
        with self._writes.lock:  # no write's forgetting between the check and the remembering
            if self._writes.generation != generation:
                return
            for digest in used:
                if digest in fresh:
                    self._verified[digest] = fresh[digest]
                else:
                    self._verified.pop(digest, None)


def _refusal(r: Any, now: float) -> str | None:
    """Why the token row `r` (with its user's `disabled`) does not authenticate at `now`, or None."""
    if r is None:
        return "invalid API token"
    if r.revoked_at is not None:
        return "API token has been revoked"
    if r.disabled:  # by the directory (directory.sync), as the console's sessions already checked
        return f"user {r.user!r} is disabled"
    if r.expires_at is not None and r.expires_at <= now:
        return "API token has expired"
    return None


VERIFIED_TTL = 0.5  # seconds a verified token is trusted without a lookup (a revocation elsewhere waits this long)
_VERIFIED_MAX = 4096
# a statement that writes an accounts table (quoted or not, as the dialect spells it)
_WRITES_ACCOUNTS = re.compile(r'^\s*(?:UPDATE|DELETE\s+FROM|INSERT\s+INTO)\s+"?(?:tokens|users|memberships|groups)"?\s', re.I)


class _Writes:
    """Counts the writes to the accounts tables through one engine, and forgets its caches on each."""

    def __init__(self, engine: Engine):
        self.generation = 0
        self.caches: list[dict] = []
        self.lock = threading.Lock()  # a bump, or a check of `generation` and what is remembered after it
        sa.event.listen(engine, "after_cursor_execute", self._executed)
        sa.event.listen(engine, "commit", self._ended)
        sa.event.listen(engine, "rollback", self._ended)
        # SQLAlchemy's "commit" event comes BEFORE the database commits: a lookup between the two still reads the
        # old row and would be kept. The connection goes back to the pool after its commit: forget once more then.
        sa.event.listen(engine, "checkin", self._returned)

    def bump(self) -> None:
        with self.lock:
            self.generation += 1
            for c in self.caches:
                c.clear()

    def _executed(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if _WRITES_ACCOUNTS.match(statement):
            conn.info["codemoat_accounts_written"] = conn.info["codemoat_accounts_returned"] = True
            self.bump()

    def _ended(self, conn) -> None:  # again once the write is visible to other connections
        try:
            written = conn.info.pop("codemoat_accounts_written", False)
        except sa.exc.InvalidRequestError:
            # the database dropped the connection mid-transaction (a restart, a failover): its info
            # is gone, and raising here would replace the caller's OperationalError (a 503) with
            # PendingRollbackError (a 500). Nothing was committed; forget the caches anyway.
            written = True
        if written:
            self.bump()

    def _returned(self, dbapi_connection, record) -> None:  # after the commit (or rollback): visible to all now
        if record is not None and record.info.pop("codemoat_accounts_returned", False):
            self.bump()


_watches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _watch_writes(engine: Engine, cache: dict) -> _Writes:
    """Forget `cache` whenever a statement through `engine` writes an accounts table (before, at and
    again after its commit, so that a lookup racing the write cannot keep the old answer)."""
    w = _watches.get(engine)
    if w is None:
        w = _watches[engine] = _Writes(engine)
    w.caches.append(cache)
    return w
