"""The route sweep of tests/serve/test_route_sweep.py at the real key server (uvicorn on 127.0.0.1): every
route of its app, each field of a lease request made hostile in turn, bodies that are not JSON, too
deep, too large or cut short, odd headers. Whatever comes in: no 5xx, a signed refusal in the key
server's shape ({"error": {"code", "message"}, "signature"}), no error in the log, and a challenge
still answered after each route's batch."""

from __future__ import annotations

import logging
import random

import httpx

from codemoat.serve.keyserver_app import MAX_BODY, create_app
from serve.test_route_sweep import hostile_bodies, raw_request

LEASE = {
    "license_id": "lic",
    "machine_id": "m",
    "nonce": "n",
    "client_time": 1,
    "signature": "c2ln",
    "snp": {"report": "00", "vcek": "AA==", "ask": "AA=="},
    "quote": {"ak": "AA==", "attest": "", "r": "", "s": ""},
}
BODIES = {"/v1/lease/challenge": {"license_id": "lic", "client_nonce": "n"}}


def test_every_key_server_route_refuses_hostile_requests_in_its_shape(vendor, keyserver, caplog):
    routes = ["/health", *create_app(vendor)._routes]  # its route table, read at run time
    assert "/v1/lease" in routes
    caplog.set_level(logging.WARNING)
    uvicorn_log = logging.getLogger("uvicorn")  # it does not propagate to the root logger caplog watches
    uvicorn_log.addHandler(caplog.handler)
    try:
        _sweep(vendor, keyserver, routes)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage()[:300] for r in errors]


def _sweep(vendor, keyserver, routes: list[str]) -> None:
    with httpx.Client(base_url=keyserver.url, timeout=60) as c:
        for path in routes:
            rng = random.Random(path)
            method = "GET" if path == "/health" else "POST"
            for what, body, ct in hostile_bodies(BODIES.get(path, LEASE), rng, over_limit=MAX_BODY):
                r = c.request(method, path, content=body, headers={"Content-Type": ct} if ct else {})
                where = f"{path} [{what}]: {r.status_code} {r.text[:300]!r}"
                assert r.status_code < 500 and "Traceback" not in r.text, where
                if r.status_code >= 400 and r.status_code not in (404, 405):
                    err = r.json()
                    assert err["error"]["code"] and err["error"]["message"] and err["signature"], where
            for extra, sent, half in [
                ([b"Authorization: Bearer \xff\xfe", b"X-Huge: " + b"a" * 200_000], b"{}", False),
                ([b"Content-Length: 1000"], b'{"license_id": "lic"', True),
                ([b"Transfer-Encoding: chunked"], b"10\r\n" + b'{"license_id": "' + b"\r\n", True),
                ([b"Content-Length: -1"], b"{}", False),
            ]:
                status, text = raw_request(keyserver.port, method, path, [*extra], sent, half=half)
                assert status != -1 and (status is None or status < 500), (path, extra[0][:30], status, text[:300])
            r = c.post("/v1/lease/challenge", json={"license_id": "lic", "client_nonce": "n"})
            assert r.status_code < 500 and r.json(), r.text[:300]  # an unknown license: a signed refusal
            assert c.get("/health").status_code == 200
