"""The admin console's "Sign in with ..." (OpenID Connect) against a real oidc-provider and a real
`codemoat serve`: an admin signs in through headless Chromium over the real redirect chain (the
provider's own login and consent pages); the attacks, scripted with httpx: a user outside the admin
groups, a replayed callback, a callback carrying another browser's state (login CSRF), a code and
an ID token issued to another application at the same provider."""

from __future__ import annotations

import sys

import httpx
import pytest
from idp_browser import walk
from oidcstack import ROOT

pytestmark = pytest.mark.slow
CALLBACK = "/admin/oidc/callback"


def _to_callback(b: httpx.Client, stack, user: str) -> str:
    """Start a console sign-in in browser `b` and log in at the provider: the callback URL it sends back."""
    return walk(b, stack.url + "/admin/oidc/start", stack.url + CALLBACK, user=user)


def test_admin_signs_in_through_the_provider_in_a_browser(oidc_stack, tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "console"))  # the console's Selenium helpers (not a package)
    from browser import chromium
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    d = chromium(tmp_path / "profile")
    try:
        d.get(oidc_stack.url + "/admin/signin")
        # the element is read again until it holds (headless Chromium can hand back a node the page
        # has just replaced: "Node with given id does not belong to the document")
        WebDriverWait(d, 30, ignored_exceptions=(WebDriverException,)).until(
            lambda d: d.find_element(By.ID, "signin-oidc").text == "Sign in with Test IdP"
        )
        WebDriverWait(d, 30, ignored_exceptions=(WebDriverException,)).until(
            lambda d: d.find_element(By.ID, "signin-oidc").click() or True
        )
        WebDriverWait(d, 60).until(lambda d: d.current_url.startswith(oidc_stack.issuer))
        d.find_element(By.NAME, "login").send_keys("bob")
        d.find_element(By.NAME, "password").send_keys("any")
        for _ in range(3):  # the provider's login page, then its consent page, until it sends the browser back
            if not d.current_url.startswith(oidc_stack.issuer):
                break
            old = d.find_element(By.TAG_NAME, "html")
            d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
            WebDriverWait(d, 60).until(ec.staleness_of(old))
        WebDriverWait(d, 60).until(lambda d: d.current_url.rstrip("/") == oidc_stack.url + "/admin")
        assert "Overview" in d.page_source and "bob" in d.page_source, d.page_source[:800]
        names = {c["name"] for c in d.get_cookies()}
        assert "codemoat_session" in names and "codemoat_oidc" not in names
    finally:
        d.quit()


def test_a_user_outside_the_admin_groups_gets_no_session(oidc_stack):
    with httpx.Client(timeout=30) as b:
        cb = _to_callback(b, oidc_stack, "alice")  # payments-devs: a developer, not an admin
        r = b.get(cb)
        assert r.status_code == 401 and "alice is not in an admin group" in r.text
        assert "codemoat_session" not in r.headers.get("set-cookie", "")
        assert b.get(oidc_stack.url + "/admin").headers["location"].endswith("/admin/signin")


def test_a_replayed_callback_is_refused(oidc_stack):
    with httpx.Client(timeout=30) as b:
        cb = _to_callback(b, oidc_stack, "bob")
        first = b.get(cb)
        assert first.status_code == 200 and "codemoat_session=" in first.headers["set-cookie"]
        again = b.get(cb)  # the same browser, the same URL: the state was consumed
        assert again.status_code == 401 and "already used" in again.text
        assert "codemoat_session=" not in again.headers.get("set-cookie", "").replace('codemoat_session=""', "")


def test_a_callback_with_another_browsers_state_signs_nobody_in(oidc_stack):
    """Login CSRF: the attacker signs in as themselves, stops before the callback and sends the URL
    to a victim. The victim's browser did not start that sign-in, so it is refused (and burned)."""
    with httpx.Client(timeout=30) as attacker, httpx.Client(timeout=30) as victim:
        cb = _to_callback(attacker, oidc_stack, "bob")
        r = victim.get(cb)  # a browser that never started a sign-in
        assert r.status_code == 401 and "did not start this sign-in" in r.text
        assert "codemoat_session=" not in r.headers.get("set-cookie", "").replace('codemoat_session=""', "")
        # a browser with a sign-in of its own under way: its cookie does not match either
        cb2 = _to_callback(attacker, oidc_stack, "bob")
        own = walk(victim, oidc_stack.url + "/admin/oidc/start", oidc_stack.issuer)  # stops at the provider
        assert own.startswith(oidc_stack.issuer) or own == ""
        assert victim.cookies.get("codemoat_oidc")
        r = victim.get(cb2)
        assert r.status_code == 401 and "did not start this sign-in" in r.text
        # the exposed state is burned: even the attacker's own browser cannot use it now
        assert attacker.get(cb2).status_code == 401


def test_a_code_or_id_token_for_another_application_is_refused(oidc_stack, tmp_path):
    """Another application registered at the same provider ("other-app") gets a code and an ID token
    for bob; neither signs bob in to codemoat's console."""
    from codemoat.config import DirectorySettings
    from codemoat.db import open_db
    from codemoat.directory import oidc as oidc_mod
    from codemoat.errors import Unauthorized

    def client(client_id: str):
        cfg = DirectorySettings(
            oidc_issuer=oidc_stack.issuer,
            oidc_client_id=client_id,
            oidc_client_secret_file=str(oidc_stack.secret_file),
            oidc_redirect_url=oidc_stack.url + "/auth/oidc/callback",
        )
        return oidc_mod.OidcClient(cfg, open_db())

    other = client("other-app")
    with httpx.Client(timeout=30) as b:
        # 1. other-app's code, delivered to codemoat's console with a state codemoat issued to this browser
        cb = _to_callback(b, oidc_stack, "bob")
        ours = httpx.URL(cb).params
        foreign = walk(b, other.start("console"), oidc_stack.url + CALLBACK, user="bob")
        r = b.get(oidc_stack.url + CALLBACK, params={"state": ours["state"], "code": httpx.URL(foreign).params["code"]})
        assert r.status_code == 401 and "refused by the provider" in r.text
        # 2. a genuine ID token issued to other-app (its own exchange) is not for codemoat's audience
        foreign = walk(b, other.start("console"), oidc_stack.url + CALLBACK, user="bob")
        captured = {}
        real = oidc_mod.OidcClient.check_id_token

        def capture(self, id_token, nonce, nonce_required=True):
            captured.update(token=id_token, nonce=nonce)
            return real(self, id_token, nonce, nonce_required)

        oidc_mod.OidcClient.check_id_token = capture
        try:
            q = httpx.URL(foreign).params
            assert other.finish(q["state"], q["code"], "console").name == "bob"  # genuine: other-app accepts it
        finally:
            oidc_mod.OidcClient.check_id_token = real
        with pytest.raises(Unauthorized, match="does not hold"):
            client("codemoat").check_id_token(captured["token"], captured["nonce"])
