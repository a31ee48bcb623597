"""An on-path attacker between serve and the company's directory (in scope: docs/threat-model.md). Over plain
http:// the OpenID provider's discovery document names its signing keys (jwks_uri), so whoever sits on the path
serves keys of their own and signs ID tokens for any user, admins included; over ldap:// without StartTLS they
answer any password's bind with success (and read the passwords). codemoat now refuses such a setting at start
for a host other than loopback, in one line, unless `directory.insecure_transport` says the path is trusted.
Only the settings are checked: nothing is connected to."""

from __future__ import annotations

import pytest

from codemoat.config import load_settings
from codemoat.errors import CodemoatError

PLAIN = [
    {"directory.oidc_issuer": "http://idp.acme.example", "directory.oidc_client_id": "codemoat"},
    {"directory.oidc_issuer": "http://10.1.2.3:8080/realms/acme", "directory.oidc_client_id": "codemoat"},
    {"directory.ldap_url": "ldap://ldap.acme.example:389"},
    {"directory.ldap_url": "ldap://[2001:db8::1]"},
]
SAFE = [
    {"directory.oidc_issuer": "https://idp.acme.example", "directory.oidc_client_id": "codemoat"},
    {"directory.oidc_issuer": "http://127.0.0.1:8080", "directory.oidc_client_id": "codemoat"},
    {"directory.oidc_issuer": "http://localhost:8080", "directory.oidc_client_id": "codemoat"},
    {"directory.ldap_url": "ldaps://ldap.acme.example:636"},
    {"directory.ldap_url": "ldap://ldap.acme.example:389", "directory.start_tls": True},
    {"directory.ldap_url": "ldap://127.0.0.1:3389"},
    {"directory.ldap_url": "ldap://[::1]:3389"},
]


@pytest.mark.parametrize("settings", PLAIN, ids=lambda s: next(iter(s.values())))
def test_a_directory_reached_without_tls_off_loopback_is_refused_in_one_line(settings):
    with pytest.raises(CodemoatError, match="insecure_transport") as e:
        load_settings(**settings)
    assert "\n" not in str(e.value)
    assert load_settings(**settings, **{"directory.insecure_transport": True})  # the admin's say-so


@pytest.mark.parametrize("settings", SAFE, ids=lambda s: next(iter(s.values())))
def test_tls_or_loopback_is_accepted(settings):
    assert load_settings(**settings)


@pytest.mark.parametrize("endpoint", ["jwks_uri", "token_endpoint", "device_authorization_endpoint", "authorization_endpoint"])
def test_a_discovery_document_naming_a_plain_http_endpoint_off_loopback_is_refused(tmp_path, endpoint):
    """The issuer itself may be TLS (or loopback), and its discovery document still name its keys or its token
    endpoint over plain http:// on another host: the same on-path attacker then serves the keys, or reads the codes
    and tokens. Refused before anything is fetched from that endpoint (only the loopback provider is connected to)."""
    from test_hostile_idp import HostileIdp, _client

    idp = HostileIdp()
    real_get = idp.server.RequestHandlerClass.do_GET

    def do_get(handler):
        import json

        doc = {
            "issuer": idp.url,
            "authorization_endpoint": idp.url + "/auth",
            "token_endpoint": idp.url + "/token",
            "device_authorization_endpoint": idp.url + "/device",
            "jwks_uri": idp.url + "/jwks",
        }
        doc[endpoint] = "http://idp.acme.example/" + endpoint
        body = json.dumps(doc).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    idp.server.RequestHandlerClass.do_GET = do_get
    try:
        client, _ = _client(idp, tmp_path)
        with pytest.raises(CodemoatError, match=f"{endpoint}.*without TLS") as e:
            client.metadata()
        assert "\n" not in str(e.value)
    finally:
        idp.server.RequestHandlerClass.do_GET = real_get
        idp.close()
