"""The OpenID provider's answers, as an on-path proxy (or a misconfigured provider) can make them: an HTML error page,
a JSON list, JSON nested past the decoder's limit, a device code whose expiry is not a number. Each used to escape
as AttributeError, RecursionError or ValueError (a 500 from serve's /auth/device/start, /auth/device/poll and the
sign-in callback, a traceback in its log); each is now a one-line refusal. A real HTTP server on 127.0.0.1 plays
the provider."""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

import pytest

from codemoat.config import DirectorySettings
from codemoat.db import open_db
from codemoat.directory.device import DeviceFlow
from codemoat.directory.oidc import OidcClient
from codemoat.errors import CodemoatError
from localhttp import LocalHTTP
from tarpit import Tarpit, bounded

DEEP = b"[" * 100_000
BAD = {
    "html": (500, b"<html><body>Internal Server Error</body></html>", "text/html"),
    "list": (200, b"[]", "application/json"),
    "list-400": (400, b"[]", "application/json"),
    "deep": (200, DEEP, "application/json"),
    "id-token-a-list": (200, b'{"id_token": ["a"]}', "application/json"),
}


class HostileIdp(LocalHTTP):
    """Discovery, then `device` for the device authorization endpoint and `token` for the token endpoint."""

    def __init__(self, meta: tuple[int, bytes, str] | None = None, device=None, token=None):
        self.answers = answers = {"device": device, "token": token}
        self.posts: list[str] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                if meta is not None:
                    return self._send(*meta)
                doc = {
                    "issuer": outer.url,
                    "authorization_endpoint": outer.url + "/auth",
                    "token_endpoint": outer.url + "/token",
                    "device_authorization_endpoint": outer.url + "/device",
                    "jwks_uri": outer.url + "/jwks",
                }
                self._send(200, json.dumps(doc).encode(), "application/json")

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.posts.append(self.path)
                got = answers.get(self.path.strip("/"))
                self._send(*(got or (404, b"{}", "application/json")))

        super().__init__(H)


def _client(idp: HostileIdp, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s")
    cfg = DirectorySettings(
        oidc_issuer=idp.url,
        oidc_client_id="codemoat",
        oidc_client_secret_file=str(secret),
        oidc_redirect_url="http://127.0.0.1:1/auth/oidc/callback",
    )
    engine = open_db()
    client = OidcClient(cfg, engine)
    return client, DeviceFlow(client, engine, 300)


def _one_line(e: pytest.ExceptionInfo) -> None:
    assert isinstance(e.value, CodemoatError) and "\n" not in str(e.value), repr(e.value)


@pytest.mark.parametrize("kind", ["html", "list", "deep", "issuer-a-list"])
def test_a_discovery_document_that_is_not_a_json_object_is_one_line(tmp_path, kind):
    idp = HostileIdp(meta=BAD.get(kind) or (200, b'{"issuer": ["x"]}', "application/json"))
    try:
        client, flow = _client(idp, tmp_path)
        with pytest.raises(Exception) as e:
            flow.start()
        _one_line(e)
    finally:
        idp.close()


@pytest.mark.parametrize(
    "kind", ["html", "list", "list-400", "deep", "expires-not-a-number", "interval-not-a-number", "code-not-a-string"]
)
def test_a_device_code_answer_the_server_cannot_read_is_one_line(tmp_path, kind):
    fields = {"device_code": "d", "user_code": "u"}
    if kind == "expires-not-a-number":
        fields["expires_in"] = "soon"
    elif kind == "interval-not-a-number":
        fields["interval"] = [5]
    elif kind == "code-not-a-string":
        fields["device_code"] = {"a": 1}
    answer = BAD.get(kind) or (200, json.dumps(fields).encode(), "application/json")
    idp = HostileIdp(device=answer)
    try:
        client, flow = _client(idp, tmp_path)
        with pytest.raises(Exception) as e:
            flow.start()
        _one_line(e)
    finally:
        idp.close()


@pytest.mark.parametrize("kind", ["list-400", "deep", "id-token-a-list"])
def test_a_token_answer_to_a_device_poll_the_server_cannot_read_is_one_line(tmp_path, kind):
    idp = HostileIdp(device=(200, b'{"device_code": "d", "user_code": "u", "interval": 1}', "application/json"))
    try:
        _, flow = _client(idp, tmp_path)
        ours = flow.start().device_code
        idp.answers["token"] = BAD[kind]
        time.sleep(1.1)  # the device flow's own interval (1 s) before the first poll, else slow_down
        with pytest.raises(Exception) as e:
            flow.poll(ours)
        _one_line(e)
    finally:
        idp.close()


@pytest.mark.parametrize("kind", ["html", "list-400", "list", "deep", "id-token-a-list"])
def test_a_token_answer_to_the_sign_in_callback_the_server_cannot_read_is_one_line(tmp_path, kind):
    idp = HostileIdp(token=BAD[kind])
    try:
        client, _ = _client(idp, tmp_path)
        state = parse_qs(urlsplit(client.start("api")).query)["state"][0]
        with pytest.raises(Exception) as e:
            client.finish(state, "a-code")
        _one_line(e)
    finally:
        idp.close()


def test_a_provider_that_drips_its_discovery_document_is_one_line_in_bounded_time(tmp_path):
    """httpx's timeout bounds each read, not the answer: a provider (or a proxy) sending its discovery document
    one byte every 0.05 s held the sign-in for good, and with it every other sign-in, which wait on discovery's
    lock. It is now 'unreachable' after 6 times directory.timeout_s."""
    tarpit = Tarpit().start()
    url = tarpit.url
    try:
        secret = tmp_path / "secret"
        secret.write_text("s")
        cfg = DirectorySettings(
            oidc_issuer=url,
            oidc_client_id="codemoat",
            oidc_client_secret_file=str(secret),
            oidc_redirect_url="http://127.0.0.1:1/auth/oidc/callback",
            timeout_s=0.5,
        )
        flow = DeviceFlow(OidcClient(cfg, open_db()), open_db(), 300)
        e = bounded(flow.start, "the sign-in still waits on the provider's discovery document")
        assert isinstance(e, CodemoatError) and "no complete answer in 3 s" in str(e), e
    finally:
        tarpit.stop()


def test_unfinished_device_codes_are_bounded_per_address_and_in_all(tmp_path, home):
    """POST /auth/device/start needs no token, and each one made the server ask the provider for a device code
    and keep a row until it expired: anyone could have the server hammer the provider and fill its database. It is
    bounded as the browser sign-in's start is (directory.oidc_pending_per_address, oidc_pending_max), before the
    provider is asked."""
    from fastapi.testclient import TestClient

    from codemoat.config import Settings
    from codemoat.engines.holder import ModelHolder
    from codemoat.serve.app import create_app

    idp = HostileIdp(device=(200, b'{"device_code": "d", "user_code": "u", "interval": 5}', "application/json"))
    secret = tmp_path / "secret"
    secret.write_text("s")
    d = {
        "oidc_issuer": idp.url,
        "oidc_client_id": "codemoat",
        "oidc_client_secret_file": str(secret),
        "oidc_redirect_url": "http://127.0.0.1:1/auth/oidc/callback",
        "oidc_pending_per_address": 3,
        "oidc_pending_max": 5,
    }
    try:
        from codemoat.accounts import Accounts

        app = create_app(Settings(directory=DirectorySettings(**d)), holder=ModelHolder("m"), accounts=Accounts(open_db()))
        with TestClient(app, base_url="http://testserver", client=("10.0.0.1", 50000)) as one:
            got = [one.post("/auth/device/start").status_code for _ in range(5)]
            assert got == [200, 200, 200, 429, 429], got
            assert idp.posts == ["/device"] * 3  # the provider was not asked for the refused ones
        with TestClient(app, base_url="http://testserver", client=("10.0.0.2", 50000)) as two:
            got = [two.post("/auth/device/start").status_code for _ in range(3)]
            assert got == [200, 200, 503], got  # 5 unfinished in all
    finally:
        idp.close()
