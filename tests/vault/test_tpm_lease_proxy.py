"""Attacker's test: an on-path proxy between a TPM-bound client and the real key server (HTTP on loopback).

The lease request's `quote` is not under the machine's signature (it is the TPM's own, over the signed
request), so a proxy can edit it. Each edit it can make gets a refusal the key server signs for this
request, which the client trusts; so none of them may be terminal (serving ends at once, like a
revocation), and each is recorded once at most (the nonce goes with the refusal). An AK other than the registered one was `unknown_ak`, terminal: a proxy that replaced
`quote.ak` with any string made the client unload at once instead of riding out an outage. A copied
home on another chip gains nothing from the change: it can as well claim the registered AK and get
`bad_quote` (test_tpm_lease), and the keys are wrapped to the registered chip anyway.
"""

from __future__ import annotations

import json

import httpx
import pytest

from attest.swtpm_fixture import *  # noqa: F403  (the swtpm fixtures; tests/ is on the path)
from attest.tpmhelp import tpm_machine

from codemoat.vault.keyserver import ATTEST_LOG, REQUEST_DOMAIN, TERMINAL, KeyServer, LeaseDenied
from codemoat.vault.lease import LeaseClient
from codemoat.vault.license import License

try:
    from .vaulthelp import bundle
except ImportError:
    from vaulthelp import bundle


def _edits(quote: dict) -> dict[str, dict]:
    return {
        "ak replaced": dict(quote, ak="30" + "ab" * 40),
        "ak dropped": {k: v for k, v in quote.items() if k != "ak"},
        "attest cut": dict(quote, attest=quote["attest"][:40]),
        "attest not base64": dict(quote, attest="*not base64*"),
        "signature not base64": dict(quote, r="%%", s="%%"),
        "latch dropped": {k: v for k, v in quote.items() if k != "latch"},
        "latch as the quote": dict(quote, latch={k: quote[k] for k in ("attest", "r", "s")}),
        "not an object": "quote",
    }


def test_no_edit_of_the_quote_in_transit_gets_a_terminal_refusal(vendor, model, tmp_path, swtpm, keyserver):
    machine = tpm_machine(swtpm, vendor)
    _, lic, _ = bundle(vendor, model, tmp_path / "out", machine, mode="lease", keyserver=keyserver.url, lease_ttl=10, grace=5)
    client = LeaseClient(License.load(lic), machine)

    def signed() -> tuple[str, dict]:
        nonce = httpx.post(keyserver.url + "/v1/lease/challenge", json={"license_id": client.lic.id}).json()["nonce"]
        return nonce, client._signed_request(nonce, REQUEST_DOMAIN)

    names = list(_edits({"ak": "", "attest": "", "r": "", "s": "", "latch": {}}))
    for name in names:
        nonce, genuine = signed()
        r = httpx.post(keyserver.url + "/v1/lease", json=dict(genuine, quote=_edits(genuine["quote"])[name]))
        err = client._refusal(r.json(), r.status_code, nonce, machine.id)
        assert isinstance(err, LeaseDenied), (name, err)  # signed and bound to this request: the client believes it
        assert err.code not in TERMINAL, (name, err.code)
        # the untouched request after it: its nonce went with the refusal, as if the proxy had dropped it
        r = httpx.post(keyserver.url + "/v1/lease", json=genuine)
        assert client._refusal(r.json(), r.status_code, nonce, machine.id).code == "bad_nonce"
    assert "lease" in httpx.post(keyserver.url + "/v1/lease", json=signed()[1]).json()  # the next renewal gets its lease
    client.close()


def _records(vendor) -> list[dict]:
    p = vendor.root / ATTEST_LOG
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def test_a_request_replayed_with_a_bad_quote_is_recorded_once_at_most(vendor, model, tmp_path, swtpm):
    """The vendor's attestation record (what a tamper event leaves) is not anyone's to fill: a signed
    request seen once (on the wire, in the client's outbound log) replayed with an edited quote was
    checked, refused and recorded every time, its nonce spent or not, before the nonce was looked at."""
    machine = tpm_machine(swtpm, vendor)
    _, lic, _ = bundle(vendor, model, tmp_path / "out", machine, mode="lease", keyserver="http://127.0.0.1:9", lease_ttl=10)
    client = LeaseClient(License.load(lic), machine)
    ks = KeyServer(vendor)
    spent = client._signed_request(ks.challenge(client.lic.id)["nonce"], REQUEST_DOMAIN)
    assert "lease" in ks.lease(spent)  # the genuine request, answered: its nonce is spent
    bad = dict(spent["quote"], ak="30" + "ab" * 40)
    for _ in range(5):
        with pytest.raises(LeaseDenied) as e:
            ks.lease(dict(spent, quote=bad))
        assert e.value.code == "bad_nonce"
    assert _records(vendor) == []
    live = client._signed_request(ks.challenge(client.lic.id)["nonce"], REQUEST_DOMAIN)
    codes = []
    for _ in range(5):  # a live nonce: the first refusal spends it and is recorded, the rest are replays
        with pytest.raises(LeaseDenied) as e:
            ks.lease(dict(live, quote=bad))
        codes.append(e.value.code)
    assert codes == ["unknown_ak"] + ["bad_nonce"] * 4
    assert [r["code"] for r in _records(vendor)] == ["unknown_ak"]
    client.close()


def _counted(monkeypatch, module, name: str) -> list[int]:
    """Count the calls of `module.name` (the real function still runs): the CPU a request costs, not timed."""
    real, calls = getattr(module, name), [0]

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(module, name, counting)
    return calls


def test_a_replayed_attested_request_costs_no_quote_check_and_a_forged_one_burns_no_nonce(
    vendor, model, tmp_path, swtpm, monkeypatch
):
    """Replays cost verification CPU: a signed TPM request seen once (on the wire, in outbound.jsonl) sent
    again had its quote (an ECDSA verify, and another for the tamper latch) checked every time before its
    spent nonce was found. Now the nonce is spent once the machine's signature holds, before the quote:
    a replay is bad_nonce with no quote check (no check at all in the process that saw it spent, one
    Ed25519 check in another worker), and a forged request still burns nothing."""
    import codemoat.vault.keyserver as ksm

    machine = tpm_machine(swtpm, vendor)
    _, lic, _ = bundle(vendor, model, tmp_path / "out", machine, mode="lease", keyserver="http://127.0.0.1:9", lease_ttl=10)
    client = LeaseClient(License.load(lic), machine)
    ks, other = KeyServer(vendor), KeyServer(vendor)  # two workers over one vendor database
    quotes, sigs = _counted(monkeypatch, ksm, "verify_quote"), _counted(monkeypatch, ksm, "verify")

    req = client._signed_request(ks.challenge(client.lic.id)["nonce"], REQUEST_DOMAIN)
    forged = dict(req, signature=req["signature"][:-4] + ("AAAA" if not req["signature"].endswith("AAAA") else "BBBB"))
    with pytest.raises(LeaseDenied) as e:
        ks.lease(forged)
    assert e.value.code == "bad_signature" and quotes[0] == 0  # no quote check for an unsigned request
    assert "lease" in ks.lease(req)  # its nonce was not burned by the forgery
    assert quotes[0] == 1
    sigs[0] = 0
    for server in [ks] * 5 + [other] * 5:
        with pytest.raises(LeaseDenied) as e:
            server.lease(req)
        assert e.value.code == "bad_nonce"
    assert quotes[0] == 1, "a replay reached the quote check"
    # Only the other worker's first replay: the machine's signature (and the instance's, when it names one).
    assert sigs[0] == 1 + ("instance" in req), "a replay this worker had seen spent cost a signature check"
    assert _records(vendor) == []
    client.close()
