"""`codemoat tokens|users|groups …`: who may call the server and what they may read."""

from __future__ import annotations

from typing import Annotated

import typer

from .apps import groups_app, tokens_app, users_app
from .common import JsonFlag, console, emit, id_column, say, table


def _accounts():
    """The accounts in the database `codemoat serve` reads: the configuration's `database_url` (the TOML file
    named by CODEMOAT_CONFIG, or CODEMOAT_DATABASE_URL), else the home's. Was: only the environment was read, so a
    `database_url` set in the TOML file put tokens in the home's database, where the server never looked."""
    from ..accounts import Accounts
    from ..config import load_settings
    from ..db import open_db

    return Accounts(open_db(load_settings(None).database_url))


def _ts(t: float | None) -> str:
    from ..durations import show_time

    return "-" if t is None else show_time(t, "%Y-%m-%d %H:%M")  # a stored time out of range is shown, not fatal


def _groups(text: str) -> list[str]:
    return [g.strip() for g in text.split(",") if g.strip()]


@tokens_app.command("create")
def tokens_create(
    *,
    name: Annotated[str, typer.Option(help="A name for the token (e.g. the person or the editor).")],
    user: Annotated[
        str | None, typer.Option(help="User the token acts as (default: a user named like the token; created if missing).")
    ] = None,
    scopes: Annotated[
        str, typer.Option(help="Comma-separated scopes: complete, chat, admin, metrics (a scraper's token for /metrics).")
    ] = "complete,chat",
    expires: Annotated[str | None, typer.Option(help="Expiry: an ISO date or a duration such as 30d.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create an API token; it is printed once and only its hash is stored."""
    from ..durations import parse_when

    info, secret = _accounts().create_token(name, user, tuple(_groups(scopes)), parse_when(expires) if expires else None)
    data = {
        "token": secret,
        "id": info.id,
        "name": info.name,
        "user": info.user,
        "scopes": list(info.scopes),
        "expires_at": info.expires_at,
    }

    def human(d):
        from rich.markup import escape

        say(f"token [bold]{d['id']}[/bold] for user {escape(d['user'])} ({', '.join(d['scopes'])}); shown once, keep it safe:")
        print(d["token"])

    emit(data, as_json, human)


@tokens_app.command("list")
def tokens_list(*, as_json: JsonFlag = False) -> None:
    """List tokens (never their secrets)."""
    rows = _accounts().list_tokens()
    data = [
        {
            "id": t.id,
            "name": t.name,
            "user": t.user,
            "scopes": list(t.scopes),
            "created_at": t.created_at,
            "expires_at": t.expires_at,
            "revoked": t.revoked_at is not None,
            "active": t.active,
            "last_used_at": t.last_used_at,
        }
        for t in rows
    ]

    def human(d):
        tab = table(id_column(d), "name", "user", "scopes", "created", "expires", "state", "last used")
        for t in d:
            state = "revoked" if t["revoked"] else ("active" if t["active"] else "expired")
            tab.add_row(
                t["id"],
                t["name"],
                t["user"],
                ",".join(t["scopes"]),
                _ts(t["created_at"]),
                _ts(t["expires_at"]),
                state,
                _ts(t["last_used_at"]),
            )
        console.print(tab)

    emit(data, as_json, human)


@tokens_app.command("revoke")
def tokens_revoke(token: Annotated[str, typer.Argument(help="Token id or name.")], *, as_json: JsonFlag = False) -> None:
    """Revoke a token: it stops working at once."""
    t = _accounts().revoke_token(token)
    emit({"revoked": t.id, "name": t.name}, as_json, lambda d: console.print(f"revoked {d['revoked']} ({d['name']})"))


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="User name.")],
    *,
    groups: Annotated[str, typer.Option(help="Comma-separated groups (created if missing).")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Add a user (every user is also in the group `everyone`)."""
    _accounts().add_user(name, _groups(groups))
    emit(
        {"user": name, "groups": _groups(groups)},
        as_json,
        lambda d: console.print(f"added user {name} in groups: {', '.join(d['groups']) or '-'}"),
    )


@users_app.command("set-groups")
def users_set_groups(
    name: Annotated[str, typer.Argument(help="User name.")],
    *,
    groups: Annotated[str, typer.Option(help="Comma-separated groups, replacing the user's current ones.")],
    as_json: JsonFlag = False,
) -> None:
    """Replace a user's groups."""
    _accounts().set_groups(name, _groups(groups))
    emit({"user": name, "groups": _groups(groups)}, as_json, lambda d: console.print(f"{name}: {', '.join(d['groups']) or '-'}"))


@users_app.command("remove")
def users_remove(name: Annotated[str, typer.Argument(help="User name.")], *, as_json: JsonFlag = False) -> None:
    """Remove a user and its tokens."""
    _accounts().remove_user(name)
    emit({"removed": name}, as_json, lambda d: console.print(f"removed user {name}", highlight=False, markup=False))


@users_app.command("list")
def users_list(*, as_json: JsonFlag = False) -> None:
    """List users and their groups."""
    data = _accounts().list_users()

    def human(d):
        tab = table("user", "groups", "created")
        for u in d:
            tab.add_row(u["name"], ", ".join(u["groups"]) or "-", _ts(u["created_at"]))
        console.print(tab)

    emit(data, as_json, human)


@groups_app.command("add")
def groups_add(name: Annotated[str, typer.Argument(help="Group name.")], *, as_json: JsonFlag = False) -> None:
    """Create a group."""
    _accounts().add_group(name)
    emit({"group": name}, as_json, lambda d: console.print(f"added group {name}", highlight=False, markup=False))


@groups_app.command("remove")
def groups_remove(name: Annotated[str, typer.Argument(help="Group name.")], *, as_json: JsonFlag = False) -> None:
    """Delete a group (its members stay)."""
    _accounts().remove_group(name)
    emit({"removed": name}, as_json, lambda d: console.print(f"removed group {name}", highlight=False, markup=False))


@groups_app.command("list")
def groups_list(*, as_json: JsonFlag = False) -> None:
    """List groups and their members."""
    data = _accounts().list_groups()

    def human(d):
        tab = table("group", "members")
        for g in d:
            tab.add_row(g["name"], ", ".join(g["members"]) or "-")
        console.print(tab)

    emit(data, as_json, human)
