"""OpenID Connect sign-in against a real provider (panva's oidc-provider, OpenID Certified, run
under Node by the test): the code flow with PKCE through `codemoat serve`, groups from the ID
token's claim, and the attacks: a replayed or forged state, a token for another audience, another
nonce, an expired token, a tampered signature."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from conftest import free_port
from oidcstack import CODEMOAT, NODE_DIR, wait_up


@pytest.fixture
def provider(tmp_path):
    """Start oidc-provider for a codemoat whose callback is on a port chosen now."""
    if shutil.which("node") is None or not (NODE_DIR / "node_modules" / "oidc-provider").is_dir():
        pytest.skip("node or oidc-provider is missing (make install runs npm ci --prefix tests/clients/node)")
    procs = []

    def start(users: dict, id_token_ttl: int = 3600, env: dict | None = None):
        port, serve_port = free_port(), free_port()
        secret = "test-secret-" + os.urandom(4).hex()
        redirect = f"http://127.0.0.1:{serve_port}/auth/oidc/callback"
        log = tmp_path / f"oidc-{port}.log"
        p = subprocess.Popen(
            ["node", "oidc_provider.mjs", str(port), "codemoat", secret, redirect, json.dumps(users), str(id_token_ttl)],
            cwd=NODE_DIR,
            env=dict(os.environ, **(env or {})),
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(p)
        issuer = f"http://127.0.0.1:{port}"
        wait_up(issuer + "/.well-known/openid-configuration", p, log, timeout=60)
        (tmp_path / "oidc-secret").write_text(secret)
        return issuer, serve_port, redirect

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def _config(tmp_path: Path, issuer: str, redirect: str, extra: str = "") -> Path:
    cfg = tmp_path / "codemoat.toml"
    cfg.write_text(f"""[directory]
oidc_issuer = "{issuer}"
oidc_client_id = "codemoat"
oidc_client_secret_file = "{tmp_path / "oidc-secret"}"
oidc_redirect_url = "{redirect}"
{extra}
[directory.group_map]
"payments-devs" = "payments"
""")
    return cfg


@pytest.fixture
def serve_on(tiny_gguf, tmp_path):
    procs = []

    def start(port: int, cfg: Path) -> str:
        log = tmp_path / f"serve-{port}.log"
        p = subprocess.Popen(
            [*CODEMOAT, "serve", "--model", str(tiny_gguf), "--host", "127.0.0.1", "--port", str(port)],
            env=dict(os.environ, CODEMOAT_CONFIG=str(cfg)),
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(p)
        url = f"http://127.0.0.1:{port}"
        wait_up(url + "/livez", p, log, timeout=60)
        return url

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=30)


class _FormParser(HTMLParser):
    """The first form of a page: its action and its inputs' names and values (as a browser posts)."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and self.action is None:
            self.action = a.get("action") or ""
        elif tag == "input" and a.get("name"):
            self.fields[a["name"]] = a.get("value") or ""


def _form(html: str) -> tuple[str, dict]:
    p = _FormParser()
    p.feed(html)
    assert p.action is not None, html[:500]
    return p.action, p.fields


def sign_in(serve_url: str, issuer: str, user: str) -> tuple[httpx.Response, str]:
    """The browser's part: start, log in at the provider, consent; the callback's response and URL."""
    with httpx.Client(follow_redirects=True, timeout=30) as b:
        r = b.get(serve_url + "/auth/oidc/start")
        assert r.url.host == "127.0.0.1" and str(r.url).startswith(issuer), r.text  # at the provider's login form
        action, fields = _form(r.text)
        r = b.post(issuer + action if action.startswith("/") else action, data={**fields, "login": user, "password": "any"})
        for _ in range(3):  # consent (and nothing else) until the provider sends the browser back
            if str(r.url).startswith(serve_url):
                break
            action, fields = _form(r.text)
            r = b.post(issuer + action if action.startswith("/") else action, data=fields)
        return r, str(r.url)


pytestmark = pytest.mark.slow


def test_code_flow_gives_a_token_with_groups_from_the_id_token(provider, serve_on, tmp_path):
    issuer, port, redirect = provider({"alice": {"groups": ["payments-devs", "unmapped"]}})
    url = serve_on(port, _config(tmp_path, issuer, redirect))
    r, callback = sign_in(url, issuer, "alice")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user"] == "alice" and "payments" in body["groups"] and "unmapped" not in body["groups"]
    assert r.headers["cache-control"] == "no-store"
    models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {body['token']}"}, timeout=30)
    assert models.status_code == 200
    # the same callback again (a replayed state and code): refused
    again = httpx.get(callback, timeout=30)
    assert again.status_code == 401 and "already used" in again.text


def test_forged_state_and_provider_errors_are_refused(provider, serve_on, tmp_path):
    issuer, port, redirect = provider({"alice": {"groups": []}})
    url = serve_on(port, _config(tmp_path, issuer, redirect))
    r = httpx.get(url + "/auth/oidc/callback", params={"state": "forged", "code": "x"}, timeout=30)
    assert r.status_code == 401 and "unknown" in r.text
    r = httpx.get(url + "/auth/oidc/callback", params={"error": "access_denied"}, timeout=30)
    assert r.status_code == 401 and "access_denied" in r.text


def _client(issuer: str, tmp_path: Path, **over):
    from codemoat.config import DirectorySettings
    from codemoat.db import open_db
    from codemoat.directory.oidc import OidcClient

    cfg = DirectorySettings(
        **{
            "oidc_issuer": issuer,
            "oidc_client_id": "codemoat",
            "oidc_redirect_url": "http://127.0.0.1:1/cb",
            "oidc_client_secret_file": str(tmp_path / "oidc-secret"),
            **over,
        }
    )
    return OidcClient(cfg, open_db())


def _id_token(issuer: str, tmp_path: Path, provider_redirect: str, serve_port: int, serve_on) -> tuple[str, str]:
    """A genuine ID token and its nonce, taken from a real code flow (the client's own exchange)."""
    from codemoat.directory import oidc as oidc_mod

    captured = {}
    real = oidc_mod.OidcClient.check_id_token

    def capture(self, id_token, nonce):
        captured.update(token=id_token, nonce=nonce)
        return real(self, id_token, nonce)

    oidc_mod.OidcClient.check_id_token = capture
    try:
        client = _client(issuer, tmp_path, oidc_redirect_url=provider_redirect)
        with httpx.Client(follow_redirects=False, timeout=30) as b:
            loc = client.start()
            for _ in range(12):
                r = b.get(loc)
                if r.is_redirect:
                    loc = r.headers["location"] if r.headers["location"].startswith("http") else issuer + r.headers["location"]
                    if loc.startswith(provider_redirect):
                        break
                    continue
                action, fields = _form(r.text)
                if "login" in fields:
                    fields.update(login="alice", password="any")
                r = b.post(issuer + action if action.startswith("/") else action, data=fields)
                loc = r.headers["location"] if r.headers["location"].startswith("http") else issuer + r.headers["location"]
        q = dict(httpx.URL(loc).params)
        client.finish(q["state"], q["code"])
        return captured["token"], captured["nonce"]
    finally:
        oidc_mod.OidcClient.check_id_token = real


def test_id_token_checks(provider, tmp_path, serve_on):
    """Audience, nonce, signature and expiry are each enforced on a real provider's ID token."""
    from codemoat.errors import Unauthorized

    issuer, port, redirect = provider({"alice": {"groups": ["payments-devs"]}}, id_token_ttl=2)
    token, nonce = _id_token(issuer, tmp_path, redirect, port, serve_on)
    ok = _client(issuer, tmp_path, oidc_leeway_s=0)
    assert ok.check_id_token(token, nonce)["sub"] == "alice"
    with pytest.raises(Unauthorized, match="does not hold"):
        ok.check_id_token(token, "another-nonce")
    with pytest.raises(Unauthorized, match="does not hold"):
        _client(issuer, tmp_path, oidc_client_id="someone-else").check_id_token(token, nonce)
    head, payload, sig = token.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    with pytest.raises(Unauthorized, match="does not hold"):
        ok.check_id_token(f"{head}.{payload}.{flipped}", nonce)
    with pytest.raises(Unauthorized, match="does not hold"):
        ok.check_id_token(f"{head}.{payload}.", nonce)  # no signature ("alg": "none"-style stripping)
    time.sleep(3.5)  # past the token's 2 s lifetime
    with pytest.raises(Unauthorized, match="does not hold"):
        ok.check_id_token(token, nonce)
    assert _client(issuer, tmp_path, oidc_leeway_s=120).check_id_token(token, nonce)["sub"] == "alice"  # clock skew allowed


def test_ed25519_id_tokens_from_the_real_provider(provider, serve_on, tmp_path):
    """oidc-provider signing ID tokens with an Ed25519 key ("alg": "EdDSA" in the header and on its JWK, RFC 8037's
    name, the only one oidc-provider 8 has): the code flow through serve gives a token, and `check_id_token` (the
    key picked by kid, the Ed25519 names as one: directory/oidc._key_named) holds the real token and refuses it
    with a flipped signature or its header renamed. oidc-provider gives a JWK labelled "Ed25519" no signing
    algorithm and publishes an unlabelled Ed25519 key as "EdDSA", so those pairings are tested against the stub
    provider (test_id_token_attacks.py)."""
    import base64

    from codemoat.errors import Unauthorized

    issuer, port, redirect = provider({"alice": {"groups": ["payments-devs"]}}, env={"OIDC_ED25519": "1"})
    jwks = httpx.get(issuer + "/jwks", timeout=30).json()["keys"]
    assert [(k["kty"], k["crv"], k.get("alg")) for k in jwks] == [("OKP", "Ed25519", "EdDSA")]
    url = serve_on(port, _config(tmp_path, issuer, redirect))
    r, _ = sign_in(url, issuer, "alice")
    assert r.status_code == 200 and r.json()["user"] == "alice" and "payments" in r.json()["groups"], r.text

    token, nonce = _id_token(issuer, tmp_path, redirect, port, serve_on)
    head, payload, sig = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    assert header["alg"] == "EdDSA" and header["kid"] == "ed-1"
    client = _client(issuer, tmp_path)
    assert client.check_id_token(token, nonce)["sub"] == "alice"
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    with pytest.raises(Unauthorized, match="does not hold"):
        client.check_id_token(f"{head}.{payload}.{flipped}", nonce)
    renamed = base64.urlsafe_b64encode(json.dumps({**header, "alg": "Ed25519"}).encode()).rstrip(b"=").decode()
    with pytest.raises(Unauthorized, match="does not hold"):  # the header is signed: renaming it breaks the signature
        client.check_id_token(f"{renamed}.{payload}.{sig}", nonce)
