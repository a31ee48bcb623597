"""Attacker's tests: hostile JSON at the real key server (uvicorn on loopback), before any signature.

A JSON string may carry a lone UTF-16 surrogate escape ("\\ud800"): Python's json parses it into a
str that cannot be encoded as UTF-8, so the first SQLite lookup of the license id (or the SNP ASK's
`.encode()`, or the refusal's own JSON) raised UnicodeEncodeError: a 500 with a traceback in the key
server's log, unsigned, from anyone who can reach it. Each must be a signed 400 refusal instead.
"""

from __future__ import annotations

import httpx
import pytest

from codemoat.vault.codec import b64d, canonical, ed_public, verify
from codemoat.vault.keyserver import REFUSAL_DOMAIN

LEASE = '{"license_id": %s, "machine_id": "m", "nonce": "n", "client_time": 1, "signature": "c2ln"%s}'
BODIES = {
    "license id, challenge": ("/v1/lease/challenge", '{"license_id": "\\ud800lic", "client_nonce": "n"}'),
    "license id, lease": ("/v1/lease", LEASE % ('"\\ud800lic"', "")),
    "license id, release": ("/v1/lease/release", LEASE % ('"lic\\udfff"', "")),
    "SNP ASK, lease": ("/v1/lease", LEASE % ('"lic"', ', "snp": {"report": "00", "vcek": "AA==", "ask": "\\udc00"}')),
    "TPM quote, lease": ("/v1/lease", LEASE % ('"lic"', ', "quote": {"ak": "\\ud801", "attest": "", "r": "", "s": ""}')),
}


@pytest.mark.parametrize("name", list(BODIES))
def test_a_lone_surrogate_escape_is_a_signed_400_not_a_500(vendor, keyserver, name):
    path, body = BODIES[name]
    r = httpx.post(keyserver.url + path, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, (name, r.status_code, r.text[:200])
    err = r.json()["error"]
    assert err["code"] == "bad_request" and "surrogate" in err["message"]
    verify(ed_public(vendor.keyserver_key_b64, "k"), b64d(r.json()["signature"]), REFUSAL_DOMAIN, canonical(err), "r")


def test_a_surrogate_pair_is_still_plain_json(vendor, keyserver):
    """A well-formed pair (an emoji as \\ud83d\\ude00) is valid JSON: refused for the unknown license, not as bad JSON."""
    body = '{"license_id": "lic\\ud83d\\ude00", "client_nonce": "n"}'
    r = httpx.post(keyserver.url + "/v1/lease/challenge", content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_license"


@pytest.mark.parametrize("path", ["/v1/lease/challenge", "/v1/lease", "/v1/lease/release"])
def test_raw_surrogate_bytes_are_a_signed_400_not_a_500(vendor, keyserver, path):
    """No escape at all: Python's json decodes bytes with 'surrogatepass', so the UTF-8-like bytes of a
    surrogate (ED A0 80) parse to the same unencodable str; the check must not rely on seeing "\\u"."""
    body = (LEASE % ('"lic\xed\xa0\x80"', "")).encode("latin-1")
    r = httpx.post(keyserver.url + path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text[:200])
    err = r.json()["error"]
    assert err["code"] == "bad_request" and "surrogate" in err["message"]
    verify(ed_public(vendor.keyserver_key_b64, "k"), b64d(r.json()["signature"]), REFUSAL_DOMAIN, canonical(err), "r")
