"""The console's cookies on a real `codemoat serve` on 127.0.0.1: over TLS every one is `Secure`, HttpOnly, SameSite
and scoped to /admin; over plain HTTP the same less `Secure`. serve has no TLS listener of its own: TLS ends at
the proxy in front (HAProxy, docs/operations.md), which says so with `X-Forwarded-Proto: https`, believed only
from a `server.trusted_proxies` peer. An on-path attacker on plain http reads a cookie that is not `Secure`, and
may set one a later https sign-in then uses (login CSRF with a double-submit value of the attacker's choosing)."""

from __future__ import annotations

import re

import httpx
from conftest import create_token

TLS = {"X-Forwarded-Proto": "https"}  # what HAProxy adds when it ended TLS (`if { ssl_fc }`)
TRUSTED = {"CODEMOAT_SERVER__TRUSTED_PROXIES": '["127.0.0.1"]'}


def _cookies(r: httpx.Response) -> dict[str, dict[str, str]]:
    """Each cookie the answer sets (not one it deletes): its attributes, names lowercased."""
    out = {}
    for h in r.headers.get_list("set-cookie"):
        name, _, rest = h.partition("=")
        value, *attrs = rest.split(";")
        if not value.strip('"'):
            continue
        out[name] = {a.strip().partition("=")[0].lower(): a.strip().partition("=")[2].lower() for a in attrs}
    return out


def _console_cookies(url: str, admin: str, headers: dict) -> dict[str, dict[str, str]]:
    """The cookies the console's sign-in pages set, asked with `headers`."""
    got = {}
    with httpx.Client(base_url=url, headers=headers) as c:
        # sign-in with an OpenID provider on a server that has none: the sign-in form again, with its cookie
        for path in ("/admin/oidc/start", "/admin/oidc/callback?state=x&code=y"):
            r = c.get(path, follow_redirects=False)
            assert r.status_code == 404 and "codemoat_signin" in _cookies(r), (path, r.headers)
            got[path] = _cookies(r)
        form = c.get("/admin/signin")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        # a browser on https sends a Secure cookie back; httpx, talking plain http to the proxy's back end, would not
        back = {"Cookie": f"codemoat_signin={form.cookies['codemoat_signin']}"}
        r = c.post("/admin/signin", data={"csrf": csrf, "token": admin}, headers=back, follow_redirects=False)
        assert r.status_code == 303, r.text[:300]
        got["signed in"] = _cookies(r)
    return got


def _flags_hold(cookies: dict[str, dict[str, str]], secure: bool) -> None:
    for where, named in cookies.items():
        for name, attrs in named.items():
            assert ("secure" in attrs) is secure, (where, name, attrs)
            assert "httponly" in attrs and attrs.get("samesite") in ("strict", "lax"), (where, name, attrs)
            assert attrs.get("path", "").startswith("/admin"), (where, name, attrs)


def test_console_cookies_are_secure_over_tls_only(serve_process, random_gguf):
    admin = create_token("--name", "ops", "--scopes", "admin")
    behind_tls = serve_process(["--model", str(random_gguf)], env=TRUSTED)
    tls = _console_cookies(behind_tls.url, admin, TLS)
    assert tls["/admin/oidc/start"]["codemoat_signin"]["samesite"] == "strict"
    assert tls["signed in"]["codemoat_session"]["samesite"] == "strict"
    _flags_hold(tls, secure=True)
    _flags_hold(_console_cookies(behind_tls.url, admin, {}), secure=False)  # the proxy's plain http listener
    assert behind_tls.stop() == 0

    # the negative: no trusted proxy, so a caller's own X-Forwarded-Proto is not believed
    untrusted = serve_process(["--model", str(random_gguf)])
    _flags_hold(_console_cookies(untrusted.url, admin, TLS), secure=False)
    assert untrusted.stop() == 0


def test_the_signin_forms_cookie_is_secure_over_tls(serve_process, random_gguf):
    behind_tls = serve_process(["--model", str(random_gguf)], env=TRUSTED)
    with httpx.Client(base_url=behind_tls.url, headers=TLS) as c:
        page = c.get("/admin/signin")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        back = {"Cookie": f"codemoat_signin={page.cookies['codemoat_signin']}"}  # as a browser on https sends it
        again = c.post("/admin/signin", data={"csrf": csrf, "token": "cm_not-a-token"}, headers=back, follow_redirects=False)
    assert again.status_code == 401
    _flags_hold({"form": _cookies(page), "again": _cookies(again)}, secure=True)
