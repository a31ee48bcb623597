"""Attacker's test: an on-path proxy between a TPM-bound client and the real key server (HTTP on loopback).

The lease request's `quote` is not under the machine's signature (it is the TPM's own, over the signed
request), so a proxy can edit it. Each edit it can make gets a refusal the key server signs for this
request, which the client trusts; so none of them may be terminal (serving ends at once, like a
revocation). An AK other than the registered one was `unknown_ak`, terminal: a proxy that replaced
`quote.ak` with any string made the client unload at once instead of riding out an outage. A copied
home on another chip gains nothing from the change: it can as well claim the registered AK and get
`bad_quote` (test_tpm_lease), and the keys are wrapped to the registered chip anyway.
"""

from __future__ import annotations

import os

import httpx
import pytest

from attest.swtpm_fixture import *  # noqa: F403  (the swtpm fixtures; tests/ is on the path)
from attest.tpmhelp import tpm_machine

from codemoat.vault.keyserver import REQUEST_DOMAIN, TERMINAL, LeaseDenied
from codemoat.vault.lease import LeaseClient
from codemoat.vault.license import License

try:
    from .vaulthelp import bundle
except ImportError:
    from vaulthelp import bundle


@pytest.fixture
def model(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF" + os.urandom(20_000))
    return p


def _edits(quote: dict) -> dict[str, dict]:
    return {
        "ak replaced": dict(quote, ak="30" + "ab" * 40),
        "ak dropped": {k: v for k, v in quote.items() if k != "ak"},
        "attest cut": dict(quote, attest=quote["attest"][:40]),
        "latch dropped": {k: v for k, v in quote.items() if k != "latch"},
        "latch as the quote": dict(quote, latch={k: quote[k] for k in ("attest", "r", "s")}),
        "not an object": "quote",
    }


def test_no_edit_of_the_quote_in_transit_gets_a_terminal_refusal(vendor, model, tmp_path, swtpm, keyserver):
    machine = tpm_machine(swtpm, vendor)
    _, lic, _ = bundle(vendor, model, tmp_path / "out", machine, mode="lease", keyserver=keyserver.url, lease_ttl=10, grace=5)
    client = LeaseClient(License.load(lic), machine)
    nonce = httpx.post(keyserver.url + "/v1/lease/challenge", json={"license_id": client.lic.id}).json()["nonce"]
    genuine = client._signed_request(nonce, REQUEST_DOMAIN)
    for name, quote in _edits(genuine["quote"]).items():
        r = httpx.post(keyserver.url + "/v1/lease", json=dict(genuine, quote=quote))
        err = client._refusal(r.json(), r.status_code, nonce, machine.id)
        assert isinstance(err, LeaseDenied), (name, err)  # signed and bound to this request: the client believes it
        assert err.code not in TERMINAL, (name, err.code)
    # the refusals spent nothing: the genuine request, as the client sent it, still gets its lease
    r = httpx.post(keyserver.url + "/v1/lease", json=genuine)
    assert r.status_code == 200 and "lease" in r.json()
    client.close()
