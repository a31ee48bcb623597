"""Mirror the directory into accounts: users, and their groups through `directory.group_map`.

A user the directory lists and has not disabled exists in codemoat with exactly the mapped groups
(the implicit `everyone` aside). A user the directory manages who is gone from it, or disabled in
it, is disabled here in the same transaction: every token revoked, every group membership removed,
so retrieval from their former repositories is refused from the next request on. Users made by hand
(never seen in the directory) are left alone. Every change is one audit record (`kind=directory`).
A user taken out of every `admin_groups` group loses each live token carrying the admin scope (it
was minted from those groups), console sessions included; their other tokens live on. A name that
moves between an OpenID subject and an LDAP entry loses every token (`directory.oidc_shares_ldap_names`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from ..accounts.store import EVERYONE, groups as groups_t, memberships, tokens, users
from ..config import DirectorySettings
from ..names import valid_name
from ..retrieve.acl import ADMIN
from .ldap import Snapshot


meta = sa.MetaData()
directory_users = sa.Table(
    "directory_users",
    meta,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("dn", sa.String(1024)),
    sa.Column("groups", sa.Text),
    sa.Column("disabled", sa.Boolean),
    sa.Column("synced_at", sa.Float),
)
directory_state = sa.Table(
    "directory_state",
    meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("last_success", sa.Float),
    sa.Column("last_attempt", sa.Float),
    sa.Column("last_error", sa.String(512)),
)


@dataclass
class SyncReport:
    added: list[str] = field(default_factory=list)
    updated: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # user -> {"from": [...], "to": [...]}
    disabled: list[str] = field(default_factory=list)
    enabled: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped_groups: list[str] = field(default_factory=list)  # directory groups with no valid codemoat name
    dry_run: bool = False
    seconds: float = 0.0

    @property
    def changes(self) -> int:
        return len(self.added) + len(self.updated) + len(self.disabled) + len(self.enabled)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "changes": self.changes}


def mapped_groups(dir_groups: frozenset[str], cfg: DirectorySettings, skipped: set[str]) -> list[str]:
    """The codemoat groups a user's directory groups grant (an empty map mirrors valid names)."""
    if cfg.group_map:
        return sorted({cfg.group_map[g] for g in dir_groups if g in cfg.group_map})
    out = set()
    for g in dir_groups:
        # never `everyone` or `admin` (retrieve.acl: reads every repository): anyone may make a group of
        # that name in many identity providers; a group_map may still name them
        if valid_name(g) and g not in (EVERYONE, ADMIN):  # the one rule for names (eng@corp was skipped here)
            out.add(g)
        else:
            skipped.add(g)
    return sorted(out)


def _set_groups(c, name: str, wanted: list[str]) -> None:
    c.execute(memberships.delete().where(memberships.c.user == name))
    for g in wanted:
        if not c.execute(sa.select(groups_t.c.name).where(groups_t.c.name == g)).first():
            c.execute(groups_t.insert().values(name=g, created_at=time.time()))
        c.execute(memberships.insert().values(user=name, group=g))


def sync(
    engine: Engine, snap: Snapshot, cfg: DirectorySettings, *, audit=None, dry_run: bool = False, partial: bool = False
) -> SyncReport:
    """Apply `snap` to the accounts in `engine` (one transaction); `audit.append` gets each change.

    `partial`: `snap` holds only some users (one signing in): nobody else is disabled, and it does
    not count as a full read of the directory."""
    t0 = time.time()
    rep = SyncReport(dry_run=dry_run)
    skipped: set[str] = set()
    records: list[dict[str, Any]] = []
    with engine.begin() as c:
        managed = {r.name: r for r in c.execute(sa.select(directory_users))}
        existing = set(c.execute(sa.select(users.c.name)).scalars())
        member_of: dict[str, list[str]] = {}
        for u, g in c.execute(sa.select(memberships.c.user, memberships.c.group)):  # one read, not one per user
            member_of.setdefault(u, []).append(g)
        now = time.time()
        for name, du in sorted(snap.users.items()):
            if du.disabled:
                continue
            wanted = mapped_groups(du.groups, cfg, skipped)
            row = managed.get(name)
            if name not in existing:
                rep.added.append(name)
                records.append({"user": name, "detail": {"action": "added", "groups": wanted}})
                if not dry_run:
                    c.execute(users.insert().values(name=name, created_at=time.time(), disabled=False))
                    _set_groups(c, name, wanted)
            else:
                have = sorted(member_of.get(name, ()))
                if row is not None and _changes_hands(row.dn, du.dn, cfg):
                    live = _live_tokens(c, name)
                    records.append({"user": name, "detail": {"action": "rebound", "tokens_revoked": len(live)}})
                    if not dry_run and live:  # minted for the other directory's person of that name
                        c.execute(tokens.update().where(tokens.c.id.in_(live)).values(revoked_at=time.time()))
                if row is not None and row.disabled:
                    rep.enabled.append(name)
                    records.append({"user": name, "detail": {"action": "enabled", "groups": wanted}})
                    if not dry_run:
                        c.execute(users.update().where(users.c.name == name).values(disabled=False))
                if have != wanted:
                    rep.updated[name] = {"from": have, "to": wanted}
                    detail: dict[str, Any] = {"action": "groups", "from": have, "to": wanted}
                    admin_tokens = _admin_tokens(c, name) if _demoted(have, wanted, cfg) else []
                    if admin_tokens:  # the admin scope was minted from groups the directory took away
                        detail["admin_tokens_revoked"] = len(admin_tokens)
                    records.append({"user": name, "detail": detail})
                    if not dry_run:
                        _set_groups(c, name, wanted)
                        if admin_tokens:
                            c.execute(tokens.update().where(tokens.c.id.in_(admin_tokens)).values(revoked_at=time.time()))
                elif row is None or not row.disabled:
                    rep.unchanged += 1
            if not dry_run:
                values = dict(dn=du.dn, groups=",".join(wanted), disabled=False, synced_at=now)
                if row is None:
                    c.execute(directory_users.insert().values(name=name, **values))
                elif partial or row.disabled or row.dn != du.dn or row.groups != values["groups"]:
                    c.execute(directory_users.update().where(directory_users.c.name == name).values(**values))
                # unchanged rows: their synced_at moves on in one statement below (a full read vouches for all)
        # managed users the directory no longer lists, or lists as disabled: cut off now
        for name, row in sorted(managed.items()) if not partial else ():
            du = snap.users.get(name)
            if (du is not None and not du.disabled) or row.disabled:
                continue
            why = "disabled in the directory" if du is not None else "gone from the directory"
            rep.disabled.append(name)
            live = _live_tokens(c, name)
            records.append(
                {
                    "user": name,
                    "detail": {
                        "action": "disabled",
                        "why": why,
                        "tokens_revoked": len(live),
                        "groups_removed": sorted(member_of.get(name, ())),
                    },
                }
            )
            if not dry_run:
                now = time.time()
                c.execute(tokens.update().where(tokens.c.user == name, tokens.c.revoked_at.is_(None)).values(revoked_at=now))
                c.execute(memberships.delete().where(memberships.c.user == name))
                c.execute(users.update().where(users.c.name == name).values(disabled=True))
                c.execute(
                    directory_users.update().where(directory_users.c.name == name).values(disabled=True, groups="", synced_at=now)
                )
        if not dry_run and not partial:
            c.execute(directory_users.update().where(directory_users.c.disabled.is_(False)).values(synced_at=now))
            _mark(c, success=True)
    rep.skipped_groups = sorted(skipped)
    rep.seconds = time.time() - t0
    if audit is not None and not dry_run:
        for r in records:
            audit.append("directory", route="directory sync", **r)
    return rep


def is_oidc(dn: str) -> bool:
    """A user bound to an OpenID provider's subject (`oidc:ISSUER#sub`), not to an LDAP entry."""
    return dn.startswith("oidc:")


def _changes_hands(old_dn: str, new_dn: str, cfg: DirectorySettings) -> bool:
    """A name moves between the LDAP directory and the OpenID provider, which the operator has not
    said name the same people (`oidc_shares_ldap_names`): its tokens were someone else's."""
    return is_oidc(old_dn) != is_oidc(new_dn) and not cfg.oidc_shares_ldap_names


def _live_tokens(c, name: str) -> list[str]:
    return list(c.execute(sa.select(tokens.c.id).where(tokens.c.user == name, tokens.c.revoked_at.is_(None))).scalars())


def _demoted(have: list[str], wanted: list[str], cfg: DirectorySettings) -> bool:
    """Was in an admin group, is in none now."""
    admins = set(cfg.admin_groups)
    return bool(admins & set(have)) and not admins & set(wanted)


def _admin_tokens(c, name: str) -> list[str]:
    """The live tokens of `name` that carry the admin scope (self-service ones, console sessions, by hand)."""
    rows = c.execute(sa.select(tokens.c.id, tokens.c.scopes).where(tokens.c.user == name, tokens.c.revoked_at.is_(None)))
    return [r.id for r in rows if "admin" in (r.scopes or "").split(",")]


def _mark(c, *, success: bool, error: str | None = None) -> None:
    now = time.time()
    values: dict[str, Any] = {"last_attempt": now, "last_error": (error or "")[:500] or None}
    if success:
        values["last_success"] = now
    if c.execute(sa.select(directory_state.c.id).where(directory_state.c.id == 1)).first():
        c.execute(directory_state.update().where(directory_state.c.id == 1).values(**values))
    else:
        c.execute(
            directory_state.insert().values(
                id=1, last_success=values.get("last_success"), **{k: v for k, v in values.items() if k != "last_success"}
            )
        )


def record_failure(engine: Engine, error: str) -> None:
    """Remember a sync that could not read the directory (for staleness and for people)."""
    with engine.begin() as c:
        _mark(c, success=False, error=error)


def last_success(engine: Engine) -> float | None:
    with engine.connect() as c:
        return c.execute(sa.select(directory_state.c.last_success).where(directory_state.c.id == 1)).scalar()


def managed_users(engine: Engine) -> dict[str, float]:
    """The enabled users the directory manages -> when the directory last confirmed them."""
    with engine.connect() as c:
        rows = c.execute(
            sa.select(directory_users.c.name, directory_users.c.synced_at).where(directory_users.c.disabled.is_(False))
        )
        return {name: at or 0.0 for name, at in rows}
