"""The key server learns of a tamper event even when a reboot comes before the next renewal (a real
swtpm, power-cycled): the reboot resets the tamper PCR, so the quote holds again, but each request
also carries the AK's certification of the tamper latch (an NV counter that survives reboots and only
counts up) over the request's nonce, and the key server refuses a count other than the provisioned one
(`tampered`, recorded vendor-side) before it wraps any key. Attacker's requests: the certification
left out, one from before the event replayed, another NV counter certified in its place."""

from __future__ import annotations

import base64
import json

import pytest

from codemoat.attest.tpm import TAMPER_PCR, TpmAttestor
from codemoat.attest.tpmcounters import AUDIT_NV_INDEX
from codemoat.vault.codec import b64e
from codemoat.vault.keyserver import ATTEST_LOG, REQUEST_DOMAIN, TERMINAL, KeyServer, LeaseDenied, quote_data
from codemoat.vault.lease import LeaseClient
from codemoat.vault.license import License
from codemoat.vault.machine import TCTI_ENV
from codemoat.vault.tpmwrap import QuoteRefused
from codemoat.vault.vendor import Vendor
from ggufs import write_gguf

from .tpmhelp import tpm_machine


def _codes(vendor) -> list[str]:
    p = vendor.root / ATTEST_LOG
    return [json.loads(x)["code"] for x in p.read_text().splitlines()] if p.exists() else []


@pytest.fixture
def leased(swtpm, tmp_path, monkeypatch):
    from vault.vaulthelp import bundle

    vendor = Vendor.init(tmp_path / "vendor")
    key = tpm_machine(swtpm, vendor)
    monkeypatch.setenv(TCTI_ENV, swtpm.tcti)
    model = tmp_path / "m.gguf"
    write_gguf(model, 20_000)
    _, lic, _ = bundle(vendor, model, tmp_path / "lease", key, mode="lease", keyserver="http://127.0.0.1:9", lease_ttl=30)
    client = LeaseClient(License.load(lic), key)
    ks = KeyServer(vendor)

    def request() -> dict:
        return client._signed_request(ks.challenge(client.lic.id)["nonce"], REQUEST_DOMAIN)

    yield vendor, ks, client, request
    client.close()
    vendor.close()


def _reboot(swtpm, monkeypatch) -> None:
    """An orderly power cycle: TPM2_Shutdown, stop, start, TPM2_Startup(CLEAR) resets the PCRs."""
    from tpm2_pytss import TPM2_SU

    with TpmAttestor(swtpm.tcti) as a:
        a.ctx.shutdown(TPM2_SU.CLEAR)
    swtpm.stop()
    swtpm.start()
    monkeypatch.setenv(TCTI_ENV, swtpm.tcti)


@pytest.mark.slow
def test_a_tamper_event_then_a_reboot_is_refused_by_the_key_server_and_recorded(leased, swtpm, monkeypatch):
    vendor, ks, client, request = leased
    before = request()
    assert "lease" in ks.lease(before)
    with TpmAttestor(swtpm.tcti) as a:  # what `codemoat appliance tamper-event` does
        a.tamper(TAMPER_PCR, b"codemoat-tamper-v1\x00chassis opened")
    _reboot(swtpm, monkeypatch)
    with TpmAttestor(swtpm.tcti) as a:
        assert a.pcr_values([TAMPER_PCR]) == [bytes(32)]  # the reboot reset the tamper PCR: the quote alone holds

    with pytest.raises(LeaseDenied) as e:
        ks.lease(request())
    assert e.value.code == "tampered" and e.value.code in TERMINAL, str(e.value)  # the client unloads at once
    assert "tamper latch has counted 1 tamper event" in str(e.value)
    assert _codes(vendor) == ["tampered"]

    # an attacker's requests after the event: each refused, nothing released
    req = request()
    del req["quote"]["latch"]  # left out (as if the latch had been deleted)
    with pytest.raises(LeaseDenied, match="no certification of the TPM's tamper latch") as e:
        ks.lease(req)
    assert e.value.code == "bad_quote"
    req = request()
    req["quote"]["latch"] = before["quote"]["latch"]  # the count from before the event, replayed
    with pytest.raises(LeaseDenied, match="stale or replayed") as e:
        ks.lease(req)
    assert e.value.code == "stale_quote"
    req = request()
    with TpmAttestor(swtpm.tcti) as a:  # another counter of this chip, certified over this very request
        a.audit_checkpoint(b"x" * 32)
        ak, _ = a._ak()
        try:
            other = a._nv_certify(ak, a._counter(AUDIT_NV_INDEX, create=False, what="audit counter"), quote_data(req))
        finally:
            a.ctx.flush_context(ak)
    req["quote"]["latch"] = {"attest": b64e(other.attest), "r": b64e(other.r), "s": b64e(other.s)}
    with pytest.raises(LeaseDenied, match="another NV index"):
        ks.lease(req)
    assert _codes(vendor) == ["tampered", "bad_quote", "stale_quote", "bad_quote"]


def test_the_latch_certification_is_bound_to_the_request_and_the_ak(leased):
    _, ks, client, request = leased
    req = request()
    assert "lease" in ks.lease(req)  # untampered: the latch holds the provisioned count
    req = request()
    raw = bytearray(base64.b64decode(req["quote"]["latch"]["s"]))
    raw[-1] ^= 1  # the AK's signature over the latch edited
    req["quote"]["latch"]["s"] = b64e(bytes(raw))
    with pytest.raises(LeaseDenied) as e:
        ks.lease(req)
    assert e.value.code == "bad_quote" and "tamper latch certification signature" in str(e.value)
    from codemoat.vault.tpmwrap import verify_quote

    req = request()
    verify_quote(client.tpm, req["quote"], quote_data(req))  # the verifier alone: the untouched request holds
    with pytest.raises(QuoteRefused, match="no certification"):  # and needs the latch its policy names
        verify_quote(client.tpm, {k: v for k, v in req["quote"].items() if k != "latch"}, quote_data(req))
