"""An attacker's look at the console's OpenID sign-in (issue 23), against the real oidc-provider and
`codemoat serve` of tests/directory/oidcstack.py: a hostile page reflecting markup through the
provider's `error`, an open redirect through a `next` parameter, session fixation, the session's
token leaking to the page or the server's log, and sign-out. All of these are stopped; the tests
show it."""

from __future__ import annotations

import re

import httpx
import pytest
from idp_browser import walk

pytestmark = pytest.mark.slow
CALLBACK = "/admin/oidc/callback"


def test_the_providers_error_is_shown_as_text_under_the_csp(oidc_stack):
    evil = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    with httpx.Client(timeout=30) as b:
        r = b.get(oidc_stack.url + CALLBACK, params={"error": evil, "state": "x"})
    assert r.status_code == 401 and "<script>alert" not in r.text and "<img src=x" not in r.text
    assert "&lt;script&gt;" in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and r.headers["x-frame-options"] == "DENY"


def test_no_return_address_leads_off_the_site(oidc_stack):
    """A `next` (or `return_to`, `redirect_uri`) on the sign-in is ignored: the browser goes to the
    configured provider only, and from the callback to /admin on this site only."""
    evil = "https://evil.example/phish"
    with httpx.Client(timeout=30) as b:
        r = b.get(
            oidc_stack.url + "/admin/oidc/start",
            params={"next": evil, "return_to": evil, "redirect_uri": evil},
            follow_redirects=False,
        )
        loc = r.headers["location"]
        assert r.status_code == 303 and loc.startswith(oidc_stack.issuer + "/") and "evil.example" not in loc
        assert httpx.URL(loc).params["redirect_uri"] == oidc_stack.url + CALLBACK
        cb = walk(b, loc, oidc_stack.url + CALLBACK, user="bob")
        r = b.get(cb + "&next=" + evil)
    assert r.status_code == 200 and "evil.example" not in r.text
    assert re.findall(r"url=([^\"']+)", r.text) == ["/admin"] and "<script" not in r.text.lower()


def test_a_planted_session_cookie_is_not_kept_and_the_sessions_token_is_never_shown(oidc_stack):
    """Session fixation: a session cookie value planted before sign-in (the attacker knows it) is
    replaced by a fresh one and signs nobody in; the token behind the session reaches neither the
    page nor the server's log; sign-out ends the session."""
    planted = "attacker-knows-this-value-" + "A" * 20
    with httpx.Client(timeout=30) as b:
        b.cookies.set("codemoat_session", planted, domain="127.0.0.1", path="/admin")
        cb = walk(b, oidc_stack.url + "/admin/oidc/start", oidc_stack.url + CALLBACK, user="bob")
        r = b.get(cb)
        assert r.status_code == 200 and "cm_" not in r.text
        fresh = re.search(r"codemoat_session=([^;]+)", r.headers["set-cookie"]).group(1)
        assert fresh != planted and len(fresh) >= 40
        with httpx.Client(timeout=30, cookies={"codemoat_session": planted}) as attacker:
            assert attacker.get(oidc_stack.url + "/admin").headers["location"].endswith("/admin/signin")
        page = b.get(oidc_stack.url + "/admin")
        assert page.status_code == 200 and "bob" in page.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        out = b.post(oidc_stack.url + "/admin/signout", data={"csrf": csrf}, headers={"Origin": oidc_stack.url})
        assert out.status_code == 303
    with httpx.Client(timeout=30, cookies={"codemoat_session": fresh}) as stolen:  # the old cookie, replayed
        assert stolen.get(oidc_stack.url + "/admin").headers["location"].endswith("/admin/signin")
    log = (oidc_stack.home.parent / "serve.log").read_text()
    assert not re.search(r"cm_[A-Za-z0-9_-]{20,}", log) and fresh not in log


@pytest.mark.parametrize("name", ["<b>x</b>", "../../etc", "x" * 200, "a b"])
def test_a_bad_token_name_is_refused_before_anyone_approves_a_code(oidc_stack, name):
    """Was broken: `codemoat login --name BAD` got a user code, and only after the developer
    approved it at the provider did minting the token fail (as a server_error), the code spent."""
    r = httpx.post(oidc_stack.url + "/auth/device/start", data={"name": name}, timeout=30)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request" and "user_code" not in r.json()
    assert "invalid token name" in r.json()["error_description"]


@pytest.mark.parametrize("code", ["", "x" * 129, "a" * 43, "' OR 1=1 --"])
def test_a_made_up_device_code_gives_nothing(oidc_stack, code):
    r = httpx.post(oidc_stack.url + "/auth/device/poll", data={"device_code": code}, timeout=30)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant" and "token" not in r.json()
