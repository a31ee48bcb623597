"""`codemoat directory sync` (mirror the company directory) and `codemoat login` (a self-service token)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .apps import app, directory_app
from .common import JsonFlag, console, emit, fail

ConfigOpt = Annotated[Path | None, typer.Option(help="TOML configuration file.", envvar="CODEMOAT_CONFIG")]


def _keeper(config: Path | None):
    from .. import paths
    from ..audit.log import AuditLog, head_file_for, verified_file_for
    from ..config import load_settings
    from ..db import open_db
    from ..directory.service import DirectoryKeeper

    s = load_settings(config)
    url = s.database_url or paths.db_url()
    engine = open_db(url)
    home = paths.home()
    audit = AuditLog(
        engine,
        checkpoint_every=s.audit.checkpoint_every,
        head_file=head_file_for(url, home),
        verified_file=verified_file_for(url, home),
    )
    return DirectoryKeeper(s, engine, audit)


@directory_app.command("sync")
def directory_sync(
    *,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would change; change nothing.")] = False,
    config: ConfigOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Mirror users and group memberships from the directory; users it no longer lists (or disabled) lose every token and group."""
    keeper = _keeper(config)
    try:
        rep = keeper.sync(dry_run=dry_run)
    finally:
        keeper.directory.close()

    def human(d: dict) -> None:
        verb = "would change" if d["dry_run"] else "changed"
        console.print(
            f"directory sync: {d['changes']} {verb} in {d['seconds']:.2f} s "
            f"({len(d['added'])} added, {len(d['updated'])} regrouped, {len(d['disabled'])} disabled, "
            f"{len(d['enabled'])} enabled, {d['unchanged']} unchanged)",
            highlight=False,
        )
        for u in d["added"]:
            console.print(f"  + {u}", highlight=False)
        for u, ch in d["updated"].items():
            console.print(f"  ~ {u}: {', '.join(ch['from']) or '-'} -> {', '.join(ch['to']) or '-'}", highlight=False)
        for u in d["disabled"]:
            console.print(f"  - {u} (tokens revoked, groups removed)", highlight=False)
        if d["skipped_groups"]:
            console.print(
                f"  directory groups with no valid codemoat name (not mirrored): {', '.join(d['skipped_groups'])}",
                highlight=False,
            )

    emit(rep.to_dict(), as_json, human)


@app.command("login")
def login(
    *,
    server: Annotated[str, typer.Option(help="The codemoat server, e.g. https://codemoat.example.com.", envvar="CODEMOAT_URL")],
    user: Annotated[str, typer.Option(help="Your directory user name.")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input (scripts).")
    ] = False,
    name: Annotated[str | None, typer.Option(help="A name for the token (default: login-USER-TIME).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Sign in with your directory password and get your own API token for your editor (shown once)."""
    import httpx

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("directory password", hide_input=True)
    try:
        r = httpx.post(
            server.rstrip("/") + "/auth/login", json={"username": user, "password": password, "name": name}, timeout=30
        )
    except httpx.HTTPError as e:
        fail(f"cannot reach {server}: {type(e).__name__}")
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    if r.status_code != 200:
        msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("error")
        fail(f"sign-in refused ({r.status_code}): {msg or r.text[:200]}")

    def human(d: dict) -> None:
        console.print(
            f"signed in as {d['user']} (groups: {', '.join(d['groups'])}; scopes: {', '.join(d['scopes'])})", highlight=False
        )
        console.print("your API token (shown once; put it in your editor's settings):", highlight=False)
        console.print(d["token"], highlight=False, soft_wrap=True)

    emit(body, as_json, human)
