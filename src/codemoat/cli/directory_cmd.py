"""`codemoat directory sync` (mirror the company directory) and `codemoat login` (a self-service token)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .apps import app, directory_app
from .common import ConfigOpt, JsonFlag, console, emit, fail, open_audit_log, say


def _keeper(config: Path | None):
    from ..config import load_settings
    from ..directory.service import DirectoryKeeper

    s = load_settings(config)
    if not s.directory.ldap_url:
        fail(
            "no LDAP directory configured: set ldap_url in the [directory] section of the TOML file that --config or "
            "CODEMOAT_CONFIG names (docs/operations.md, 'The company directory')"
        )
    audit = open_audit_log(s)
    return DirectoryKeeper(s, audit.engine, audit)


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
    user: Annotated[
        str | None,
        typer.Option(help="Your directory user name: sign in with your LDAP password (without it: a device code)."),
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input (scripts).")
    ] = False,
    browser: Annotated[
        bool, typer.Option("--browser", help="Open the sign-in page in a browser (default: only print its address).")
    ] = False,
    name: Annotated[str | None, typer.Option(help="A name for the token (default: login-USER-TIME).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Get your own API token for your editor, from the company's directory or identity provider.

    With your directory password (--user), or by approving a device code with the company's identity provider.
    The token is shown once and kept 0600 in $CODEMOAT_HOME/login.json."""
    import httpx

    from ..directory.login_client import NO_SIGN_IN, NoDeviceFlow, check_server, device_login, save_login
    from ..errors import CodemoatError

    try:
        check_server(server)
    except CodemoatError as e:
        fail(str(e))
    if user is None:
        try:
            body = device_login(server, lambda st: _show_code(st, browser, as_json), name=name)
        except NoDeviceFlow as e:
            body = _browser_fallback(server, e, browser)
        except CodemoatError as e:
            fail(str(e))
    else:
        if password_stdin or not sys.stdin.isatty():  # piped: no prompt, no getpass warning
            password = sys.stdin.readline().rstrip("\n")
            if not password:
                fail("no password on standard input: run `codemoat login` in a terminal, or pipe it with --password-stdin")
        else:
            password = typer.prompt("directory password", hide_input=True)
        try:
            r = httpx.post(
                server.rstrip("/") + "/auth/login", json={"username": user, "password": password, "name": name}, timeout=30
            )
        except httpx.HTTPError as e:
            fail(f"cannot reach {server}: {type(e).__name__}")
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code == 404:
            fail(f"{server} offers no directory sign-in: {NO_SIGN_IN} sets no directory.ldap_url")
        if r.status_code != 200:
            msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("error")
            fail(f"sign-in refused ({r.status_code}): {msg or r.text[:200]}")
    body["saved_to"] = str(save_login(server, body))

    def human(d: dict) -> None:
        if d.get("user"):
            console.print(
                f"signed in as {d['user']} (groups: {', '.join(d['groups'])}; scopes: {', '.join(d['scopes'])})",
                highlight=False,
            )
        console.print("your API token (shown once; put it in your editor's settings):", highlight=False)
        say(d["token"])
        console.print(f"kept in {d['saved_to']} (readable by you only)", highlight=False)

    emit(body, as_json, human)


def _show_code(start: dict, browser: bool, as_json: bool) -> None:
    """What a person needs to approve the code, and how to tell a phishing page from the real one."""
    out = sys.stderr if as_json else sys.stdout
    minutes = max(1, round(start["expires_in"] / 60))
    print(
        f"To sign in to codemoat at {start['server']}, open {start['verification_uri']}\n"
        f"and enter the code {start['user_code']} (it expires in {minutes} min).\n"
        f"Only enter it if you ran `codemoat login` yourself just now; the page is your company's sign-in ({start['issuer']}).",
        file=out,
        flush=True,
    )
    if browser:
        import webbrowser

        webbrowser.open(start.get("verification_uri_complete") or start["verification_uri"])


def _browser_fallback(server: str, e, browser: bool) -> dict:
    """No device flow at the provider: sign in through the browser, which shows a token once; paste it here."""
    import httpx

    print(f"{e}\nOpen {e.signin_url} , sign in, and paste the token the page shows.", file=sys.stderr, flush=True)
    if browser:
        import webbrowser

        webbrowser.open(e.signin_url)
    token = (typer.prompt("token", hide_input=True) if sys.stdin.isatty() else sys.stdin.readline()).strip()
    r = httpx.get(server.rstrip("/") + "/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    if r.status_code != 200:
        fail(f"{server} does not accept that token ({r.status_code})")
    return {"token": token}
