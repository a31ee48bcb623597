"""`codemoat login` with a device code (RFC 8628) against a real oidc-provider and a real
`codemoat serve`: the developer approves the code on the provider's own /device pages (scripted with
httpx: its code entry, confirmation, login and consent forms), the CLI polls and keeps the token
0600. And the refusals: denial, polling too fast (slow_down), expiry, a code used twice, a provider
without a device flow."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time

import httpx
import pytest
from idp_browser import walk
from oidcstack import CODEMOAT

pytestmark = pytest.mark.slow


def _approve(stack, user_code: str, user: str = "alice", abort: bool = False) -> None:
    with httpx.Client(timeout=30) as b:
        assert walk(b, stack.issuer + "/device", stack.url, user=user, user_code=user_code, abort=abort) == ""


def _start(stack) -> dict:
    r = httpx.post(stack.url + "/auth/device/start", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _poll(stack, device_code: str) -> httpx.Response:
    return httpx.post(stack.url + "/auth/device/poll", data={"device_code": device_code}, timeout=30)


def test_codemoat_login_with_a_device_code(oidc_stack, home):
    p = subprocess.Popen(
        [*CODEMOAT, "login", "--server", oidc_stack.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, CODEMOAT_HOME=str(home)),
    )
    lines = [p.stdout.readline() for _ in range(3)]
    text = "".join(lines)
    assert f"codemoat at {oidc_stack.url}" in text and oidc_stack.issuer in text, text
    user_code = text.split("enter the code ")[1].split(" ")[0]
    _approve(oidc_stack, user_code, "alice")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "signed in as alice" in out and "payments" in out
    saved = home / "login.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    kept = json.loads(saved.read_text())
    assert kept["server"] == oidc_stack.url and kept["user"] == "alice" and kept["token"] in out
    models = httpx.get(oidc_stack.url + "/v1/models", headers={"Authorization": f"Bearer {kept['token']}"}, timeout=30)
    assert models.status_code == 200


def test_polling_too_fast_then_a_code_used_twice(oidc_stack):
    st = _start(oidc_stack)
    assert st["expires_in"] <= 300 and st["interval"] >= 1
    r = _poll(oidc_stack, st["device_code"])  # at once, before the interval: slow down
    assert r.status_code == 400 and r.json()["error"] == "slow_down"
    time.sleep(st["interval"] + 5.2)
    r = _poll(oidc_stack, st["device_code"])
    assert r.status_code == 400 and r.json()["error"] == "authorization_pending", r.text
    _approve(oidc_stack, st["user_code"], "bob")
    time.sleep(st["interval"] + 5.2)  # the interval grew by 5 s at slow_down (RFC 8628 §3.5)
    r = _poll(oidc_stack, st["device_code"])
    assert r.status_code == 200, r.text
    assert r.json()["user"] == "bob" and "admin" in r.json()["scopes"]
    assert r.headers["cache-control"] == "no-store"
    again = _poll(oidc_stack, st["device_code"])
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant" and "already used" in again.text
    assert _poll(oidc_stack, "forged-" + st["device_code"][7:]).json()["error"] == "invalid_grant"


def test_a_denied_code_gives_no_token(oidc_stack):
    st = _start(oidc_stack)
    _approve(oidc_stack, st["user_code"], "alice", abort=True)
    time.sleep(st["interval"] + 0.2)
    r = _poll(oidc_stack, st["device_code"])
    assert r.status_code == 400 and r.json()["error"] == "access_denied", r.text
    time.sleep(st["interval"] + 0.2)
    assert _poll(oidc_stack, st["device_code"]).json()["error"] == "expired_token"  # and it stays dead


def _flow(issuer: str, secret_file, ttl_s: int):
    from codemoat.config import DirectorySettings
    from codemoat.db import open_db
    from codemoat.directory.device import DeviceFlow
    from codemoat.directory.oidc import OidcClient

    cfg = DirectorySettings(
        oidc_issuer=issuer,
        oidc_client_id="codemoat",
        oidc_client_secret_file=str(secret_file),
        oidc_redirect_url="http://127.0.0.1:1/auth/oidc/callback",
    )
    engine = open_db()
    return DeviceFlow(OidcClient(cfg, engine), engine, ttl_s)


def test_an_expired_code_is_refused_even_once_approved(oidc_stack):
    from codemoat.directory.device import DeviceError

    flow = _flow(oidc_stack.issuer, oidc_stack.secret_file, ttl_s=2)
    st = flow.start()
    assert st.expires_in == 2  # ours, shorter than the provider's
    _approve(oidc_stack, st.user_code, "alice")
    time.sleep(2.2)
    with pytest.raises(DeviceError) as e:
        flow.poll(st.device_code)
    assert e.value.code == "expired_token"


def test_a_provider_without_a_device_flow_sends_the_cli_to_the_browser(tmp_path, tiny_gguf, home):
    from oidcstack import start_stack

    from codemoat.directory.device import DeviceUnsupported
    from codemoat.directory.login_client import NoDeviceFlow, device_login

    stack = start_stack(tmp_path, tiny_gguf, {"alice": {"groups": []}}, device=False)
    try:
        with pytest.raises(DeviceUnsupported):
            _flow(stack.issuer, stack.secret_file, 300).start()
        with pytest.raises(NoDeviceFlow) as e:
            device_login(stack.url, show=lambda st: None)
        assert e.value.signin_url == stack.url + "/auth/oidc/start"
        # the CLI says where to sign in, and takes the token that page shows
        with httpx.Client(timeout=30) as b:
            cb = walk(b, e.value.signin_url, stack.url + "/auth/oidc/callback", user="alice")
            shown = b.get(cb).json()["token"]
        r = subprocess.run(
            [*CODEMOAT, "login", "--server", stack.url],
            input=shown + "\n",
            capture_output=True,
            text=True,
            env=dict(os.environ, CODEMOAT_HOME=str(home)),
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        assert "has no device flow" in r.stderr and e.value.signin_url in r.stderr
        assert json.loads((home / "login.json").read_text())["token"] == shown
        r = subprocess.run(
            [*CODEMOAT, "login", "--server", stack.url], input="cm_not-a-token\n", capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 1 and "does not accept that token" in r.stderr
    finally:
        stack.stop()


@pytest.mark.parametrize("route,field", [("/auth/device/start", "name"), ("/auth/device/poll", "device_code")])
def test_a_body_nested_past_the_decoders_limit_is_answered_as_any_bad_body_not_a_500(oidc_stack, route, field):
    """Anyone may call the two device routes (no token yet). A JSON body nested deeper than the decoder goes
    (8 KiB of '[' is read) raised RecursionError out of serve.directory._field, which caught only
    ValueError: a 500 from the server. Now it is answered as a body that is not JSON at all is."""

    def post(body: bytes) -> httpx.Response:
        return httpx.post(oidc_stack.url + route, content=body, headers={"Content-Type": "application/json"}, timeout=30)

    plain = post(b'{"%s": not json' % field.encode())
    assert plain.status_code in (200, 400), plain.text  # start: no name given; poll: no such code
    r = post(b'{"%s": ' % field.encode() + b"[" * 8000)
    assert r.status_code == plain.status_code, (r.status_code, r.text[:300])
    assert ("error" in r.json()) == ("error" in plain.json()) and r.json().get("error") == plain.json().get("error")
