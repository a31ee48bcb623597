"""X-Forwarded-For is believed only from `server.trusted_proxies` (a real `codemoat serve`, real HTTP).

uvicorn's default trusts it from 127.0.0.1: any local process, or a proxy on the host that passes the
client's header through, then picked the address that audit records, the per-source tally of requests
without a token and the sign-in bounds see. Behind HAProxy the setting names HAProxy
(tests/deploy/test_replicas.py runs it so)."""

from __future__ import annotations

import httpx
import pytest
from conftest import run_cli

from codemoat.audit.log import AuditLog
from codemoat.db import open_db

FORGED = [f"203.0.113.{i}" for i in range(1, 6)]


def _knock(url: str) -> None:
    """Five requests without a token, each naming another address in X-Forwarded-For."""
    for addr in FORGED:
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers={"X-Forwarded-For": addr})
        assert r.status_code == 401


def _clients(kind: str) -> list:
    log = AuditLog(open_db(None))
    return [(r["client"], (r["detail"] or {}).get("count")) for r in log.records(kind=kind)]


def test_a_forged_forwarded_for_from_an_untrusted_peer_changes_nothing(serve_process, random_gguf):
    """Fails before: five records, each with the address the caller made up, none tallied."""
    server = serve_process(["--model", str(random_gguf)])
    _knock(server.url)
    assert server.stop() == 0  # the open tally is written at shutdown
    assert _clients("request") == [("127.0.0.1", None)]  # the peer's own address, recorded once
    assert _clients("unauthenticated") == [("127.0.0.1", 4)]  # the rest counted against it: no way round the tally


def test_a_configured_proxy_is_believed(serve_process, random_gguf):
    server = serve_process(["--model", str(random_gguf)], env={"CODEMOAT_SERVER__TRUSTED_PROXIES": '["127.0.0.1"]'})
    _knock(server.url)
    assert server.stop() == 0
    assert _clients("request") == [(a, None) for a in FORGED]


def test_a_trusted_proxy_that_is_not_an_address_is_one_line(random_gguf):
    r = run_cli("serve", "--model", str(random_gguf), "--port", "0", env={"CODEMOAT_SERVER__TRUSTED_PROXIES": '["haproxy"]'})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "server.trusted_proxies" in r.stderr and "'haproxy' is not an IP address or network" in r.stderr, r.stderr


def test_trusting_every_address_is_refused():
    """0.0.0.0/0 (or ::/0) would let every caller name any address: refused as the settings load."""
    from pydantic import ValidationError

    from codemoat.config import ServerSettings

    for everyone in ("0.0.0.0/0", "::/0"):
        with pytest.raises(ValidationError, match="is every address"):
            ServerSettings(trusted_proxies=["127.0.0.1", everyone])
    assert ServerSettings(trusted_proxies=["10.0.0.0/8", "::1"]).trusted_proxies == ["10.0.0.0/8", "::1"]


def test_a_network_with_host_bits_is_refused():
    """Fails before: '127.0.0.1/8' was accepted, and uvicorn (which reads a network strictly) took it for a
    literal that no peer matches: the proxy silently not believed, every editor behind it one address."""
    from pydantic import ValidationError
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    from codemoat.config import ServerSettings
    from codemoat.serve.run import believed

    with pytest.raises(ValidationError, match=r"'127\.0\.0\.1/8' has host bits set: write 127\.0\.0\.0/8"):
        ServerSettings(trusted_proxies=["127.0.0.1/8"])
    accepted = ServerSettings(trusted_proxies=["127.0.0.0/8", "10.0.0.5/32", "::1"]).trusted_proxies
    trusted = ProxyHeadersMiddleware(None, believed(accepted)).trusted_hosts  # what `serve.run` hands uvicorn
    assert all(peer in trusted for peer in ("127.0.0.5", "10.0.0.5", "::1", "::ffff:10.0.0.5"))
    assert "10.0.0.6" not in trusted and "::ffff:10.0.0.6" not in trusted


def test_an_ipv4_proxy_is_believed_on_a_dual_stack_listener(serve_process, random_gguf):
    """server.host '::' takes IPv4 peers too, as '::ffff:a.b.c.d'. Fails before: an IPv4 entry did not match that
    form, so the proxy was silently not believed (every editor behind it one address)."""
    server = serve_process(
        ["--model", str(random_gguf), "--host", "::"], env={"CODEMOAT_SERVER__TRUSTED_PROXIES": '["127.0.0.0/8"]'}
    )
    _knock(server.url)
    assert server.stop() == 0
    assert _clients("request") == [(a, None) for a in FORGED]
