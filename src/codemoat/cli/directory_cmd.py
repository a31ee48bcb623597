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
    from ..directory.login_client import NoDeviceFlow, check_server, device_login, login_path, password_login, save_login
    from ..errors import CodemoatError

    try:
        check_server(server)
        # before a password is read or a code shown: a token the server issued could otherwise be neither kept nor shown
        login_path()
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
            body = password_login(server, user, password, name)
        except CodemoatError as e:
            fail(str(e))
    try:
        body["saved_to"] = str(save_login(server, body))
    except CodemoatError as e:  # the folder changed since `login_path()`: the token is shown (as always) so it is not lost
        body["saved_to"] = None
        emit(body, as_json, _show_login)
        fail(f"{e}: the token above is not kept; put it in your editor's settings yourself")
    emit(body, as_json, _show_login)


def _show_login(d: dict) -> None:
    """The token, for people: who it is for, the token itself (shown once), and where it is kept. The server's names
    are checked printable (`login_client.checked_login`) and escaped here, so none is read as rich markup."""
    from rich.markup import escape

    if d.get("user"):
        console.print(
            escape(f"signed in as {d['user']} (groups: {', '.join(d['groups'])}; scopes: {', '.join(d['scopes'])})"),
            highlight=False,
        )
    console.print("your API token (shown once; put it in your editor's settings):", highlight=False)
    say(escape(d["token"]))
    if d.get("saved_to"):
        console.print(escape(f"kept in {d['saved_to']} (readable by you only)"), highlight=False)


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
    from ..directory.login_client import TOKEN_CHARS

    token = (typer.prompt("token", hide_input=True) if sys.stdin.isatty() else sys.stdin.readline()).strip()
    if not TOKEN_CHARS.fullmatch(token):  # an HTTP header cannot carry it ("UnicodeEncodeError"), or nothing was pasted
        fail("that is not a token: paste it as the sign-in page showed it (cm_...)")
    try:
        r = httpx.get(server.rstrip("/") + "/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    except httpx.HTTPError as e:
        fail(f"cannot reach {server}: {type(e).__name__}")
    if r.status_code != 200:
        fail(f"{server} does not accept that token ({r.status_code})")
    return {"token": token}
