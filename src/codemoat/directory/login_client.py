"""The developer's side of `codemoat login`: the device flow against a codemoat server (which
relays RFC 8628 to the company's OpenID provider), and where the token is kept.

    body = device_login("https://codemoat.example.com", show=print_code)  # polls until yes/no/expiry
    path = save_login("https://codemoat.example.com", body)              # $CODEMOAT_HOME/login.json, 0600

`login_path()` says first (before a password is read or a code shown) whether the token can be kept at all, and
every token answer (`password_login`, `device_login`) is checked whole by `checked_login` before any of it is kept
or shown: a server that answered 200 without a token got `"token": null` written over the saved login.

`show` gets the server's answer to the start (user code, verification URI, expiry, the server's
own address) before the first poll. Polls follow RFC 8628 §3.5: wait `interval` seconds, add 5 on
`slow_down`, keep going on `authorization_pending`, stop on anything else.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ..errors import CodemoatError
from .device import SLOW_DOWN_STEP_S

LOGIN_FILE = "login.json"
#: what a bearer token is made of (codemoat's `cm_...`, base64, a JWT): printable, no space, no markup or escapes
TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]{1,4096}")


NO_SIGN_IN = "it is not a codemoat server, or its configuration's [directory] section (docs/operations.md)"


class NoDeviceFlow(CodemoatError):
    """The server's provider has no device flow; `signin_url` is the browser sign-in that shows a token."""

    def __init__(self, message: str, signin_url: str):
        super().__init__(message)
        self.signin_url = signin_url


def _post(url: str, data: dict) -> httpx.Response:
    try:
        return httpx.post(url, data=data, timeout=30)
    except httpx.HTTPError as e:
        raise CodemoatError(f"cannot reach {url}: {type(e).__name__}") from None


def _error(r: httpx.Response) -> tuple[str, str]:
    try:
        body = r.json()
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):  # not JSON, or JSON of another shape (`.get` on a list ended in AttributeError)
        return "server_error", f"HTTP {r.status_code}"
    err = body.get("error")
    if isinstance(err, dict):  # a codemoat error in the API's own shape
        return str(err.get("code") or "server_error"), str(err.get("message") or r.status_code)
    return str(err or "server_error"), str(body.get("error_description") or err or r.status_code)


def device_login(
    server: str,
    show: Callable[[dict[str, Any]], None],
    name: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Start a device-code sign-in at `server`, show the code, poll until the provider answers: the token body."""
    check_server(server)
    base = server.rstrip("/")
    r = _post(base + "/auth/device/start", {"name": name} if name else {})
    if r.status_code != 200:
        code, msg = _error(r)
        if code == "device_flow_unsupported":
            raise NoDeviceFlow(msg, _signin_url(r, base))
        if r.status_code == 404:
            raise CodemoatError(f"{base} offers no sign-in with an identity provider: {NO_SIGN_IN} sets no directory.oidc_issuer")
        raise CodemoatError(f"{base} refused to start a sign-in ({r.status_code}): {msg}")
    start = _checked_start(r, base)
    show(start)
    interval = max(int(start.get("interval") or 5), 1)
    deadline = time.monotonic() + int(start.get("expires_in") or 300) + interval
    while True:
        sleep(interval)
        r = _post(base + "/auth/device/poll", {"device_code": start["device_code"]})
        if r.status_code == 200:
            return checked_login(r, base)
        code, msg = _error(r)
        if code == "authorization_pending" and time.monotonic() < deadline:
            continue
        if code == "slow_down" and time.monotonic() < deadline:  # else a server saying only slow_down held it for good
            interval += SLOW_DOWN_STEP_S
            continue
        raise CodemoatError(f"sign-in did not complete ({code}): {msg}")


def _signin_url(r: httpx.Response, base: str) -> str:
    """The browser sign-in a server without a device flow names, if it is an http(s) address (it is opened with
    --browser: a `file://` or `javascript:` one must not be); else the server's own."""
    try:
        url = r.json().get("signin_url")
    except (ValueError, AttributeError, RecursionError):
        url = None
    ok = isinstance(url, str) and len(url) <= 2048 and url.isprintable() and url.lower().startswith(("https://", "http://"))
    return url if ok else base + "/auth/oidc/start"


def password_login(server: str, username: str, password: str, name: str | None = None) -> dict[str, Any]:
    """Trade a directory password for a token at `server` (`POST /auth/login`): the checked token answer."""
    check_server(server)
    base = server.rstrip("/")
    try:
        r = httpx.post(base + "/auth/login", json={"username": username, "password": password, "name": name}, timeout=30)
    except httpx.HTTPError as e:
        raise CodemoatError(f"cannot reach {server}: {type(e).__name__}") from None
    if r.status_code == 404:
        raise CodemoatError(f"{server} offers no directory sign-in: {NO_SIGN_IN} sets no directory.ldap_url")
    if r.status_code != 200:
        _, msg = _error(r)
        if msg in (f"HTTP {r.status_code}", str(r.status_code)):  # no message of its own: the start of its page
            msg = r.text[:200] or msg
        raise CodemoatError(f"sign-in refused ({r.status_code}): {msg}")
    return checked_login(r, base)


def _printable(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 256 and v.isprintable()


def _login_fault(body: Any) -> str | None:
    """What the token answer `body` lacks, in words; None when it is whole."""
    if not isinstance(body, dict):
        return "is not a JSON object"
    token = body.get("token")
    if token is None:
        return 'has no "token"'
    if not (isinstance(token, str) and TOKEN_CHARS.fullmatch(token)):
        return 'has a "token" that is not a token (letters, digits and ._~+/=- only)'
    if body.get("user") is not None:
        if not _printable(body["user"]):
            return 'has a "user" that is not a printable name'
        for k in ("groups", "scopes"):  # shown beside the user
            if not (isinstance(body.get(k), list) and all(_printable(g) for g in body[k])):
                return f'has no "{k}" list of printable names'
    for k in ("token_id", "name"):
        if body.get(k) is not None and not _printable(body[k]):
            return f'has a "{k}" that is not printable text'
    e = body.get("expires_at")
    if e is not None and (isinstance(e, bool) or not isinstance(e, int | float) or not math.isfinite(e)):
        return 'has an "expires_at" that is not a number'
    return None


def checked_login(r: httpx.Response, base: str) -> dict[str, Any]:
    """A server's 200 answer to a sign-in, checked whole before any of it is kept or shown (it reaches the terminal,
    so no control characters either): the body, or a one-line error naming what it lacks."""
    try:
        body = r.json()
    except (ValueError, RecursionError):
        fault = f"is not JSON ({r.text[:40]!r})"
    else:
        fault = _login_fault(body)
    if fault is not None:
        raise CodemoatError(f"{base} answered the sign-in, but its reply {fault}: nothing was kept (is it a codemoat server?)")
    return body


def _checked_start(r: httpx.Response, base: str) -> dict[str, Any]:
    """The server's answer to the start, checked before any of it reaches the terminal or the browser: its text
    (relayed from the OpenID provider) without control characters (escape sequences rewrite the screen or, OSC 52,
    the clipboard), its addresses http(s) only, its times numbers."""
    try:
        start = r.json()
    except (ValueError, RecursionError):
        start = None
    texts = ("device_code", "user_code", "verification_uri", "server", "issuer")
    ok = isinstance(start, dict) and all(
        isinstance(start.get(k), str) and 0 < len(start[k]) <= 2048 and start[k].isprintable() for k in texts
    )
    if ok and start.get("verification_uri_complete") is not None:
        v = start["verification_uri_complete"]
        ok = isinstance(v, str) and len(v) <= 2048 and v.isprintable()
    ok = ok and all(
        start.get(k) is None or start[k].lower().startswith(("https://", "http://"))
        for k in ("verification_uri", "verification_uri_complete")
    )
    ok = ok and all(
        start.get(k) is None or (isinstance(start[k], int) and not isinstance(start[k], bool) and 0 <= start[k] < 86400)
        for k in ("expires_in", "interval")
    )
    if not ok:
        raise CodemoatError(
            f"{base} answered the sign-in start with a malformed answer (a field missing, control characters, an "
            "address that is not http(s), or a time that is not a number): nothing of it was shown or opened"
        )
    return start


def check_server(server: str) -> None:
    """Refuse a server address that would carry a password or a token in the clear: https://, or
    http:// to this machine only (127.0.0.0/8, ::1, localhost); no user:password@ in it either."""
    import ipaddress

    try:
        u = httpx.URL(server)
    except (httpx.InvalidURL, TypeError):
        u = None
    if u is None or u.scheme not in ("http", "https") or not u.host or not (u.port is None or 0 < u.port < 65536):
        raise CodemoatError(f"{server!r} is not a server address: give https://HOST[:PORT]")
    if u.userinfo:
        raise CodemoatError("put no user name or password in the server's address: give https://HOST[:PORT]")
    if u.scheme == "https" or u.host == "localhost":
        return
    try:
        if ipaddress.ip_address(u.host).is_loopback:
            return
    except ValueError:
        pass
    raise CodemoatError(
        f"{server} is plain HTTP to another machine: your password and token would cross the network in the clear; use https://"
    )


def login_path() -> Path:
    """Where `save_login` keeps the token, checked before anyone signs in: a folder at login.json (or a data folder
    this account cannot write in) failed only at the rename, once the server had issued a token that was then
    neither kept nor shown."""
    import tempfile

    from ..paths import home

    path = home() / LOGIN_FILE
    if path.is_dir() and not path.is_symlink():  # a symlink is replaced, never followed
        raise CodemoatError(f"{path} is a folder: move it away, then sign in again (the token is kept in a file there)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".login-", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CodemoatError(f"cannot keep a token in {path.parent}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(tmp)
    return path


def save_login(server: str, body: dict[str, Any]) -> Path:
    """Keep the token where this account alone can read it (0600), with its server and expiry: written
    to a new file of our own (O_EXCL, 0600; never a leftover or a planted symlink), then renamed over.
    A failure is one line naming the file; the file there before is left as it was."""
    import tempfile

    from ..paths import home

    path = home() / LOGIN_FILE
    keep = {"server": server.rstrip("/"), **{k: body.get(k) for k in ("token", "user", "token_id", "scopes", "expires_at")}}
    try:
        fd, tmp = tempfile.mkstemp(prefix=".login-", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CodemoatError(f"cannot keep the token in {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(keep, f, indent=2)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CodemoatError(f"cannot keep the token in {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
