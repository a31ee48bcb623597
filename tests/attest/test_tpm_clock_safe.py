"""clockInfo.safe = NO (a real swtpm killed without TPM2_Shutdown, as by a power loss): the key server
accepts it only from a boot it has not seen (a strictly greater reset count), and the rest of that
boot; the same reset count with an unsafe clock is refused like a rollback (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import signal

import pytest
import sqlalchemy as sa

from codemoat.attest.tpm import TpmAttestor
from codemoat.vault.keyserver import REQUEST_DOMAIN, KeyServer, LeaseDenied
from codemoat.vault.lease import LeaseClient
from codemoat.vault.license import License
from codemoat.vault.machine import TCTI_ENV
from codemoat.vault.tpmbind import key_id, tpm_keys_t
from codemoat.vault.tpmwrap import parse_quote
from codemoat.vault.vendor import Vendor
from ggufs import write_gguf

from .tpmhelp import tpm_machine


@pytest.mark.slow
def test_an_unsafe_tpm_clock_is_accepted_only_from_a_new_boot(database_url, swtpm, tmp_path, monkeypatch):
    from vault.vaulthelp import bundle

    vendor = Vendor.init(tmp_path / "vendor", database_url=database_url)
    key = tpm_machine(swtpm, vendor)
    model = tmp_path / "m.gguf"
    write_gguf(model, 20_000)
    _, lic_path, _ = bundle(vendor, model, tmp_path / "out", key, mode="lease", keyserver="http://127.0.0.1:9")
    lic = License.load(lic_path)
    client = LeaseClient(lic, key)
    ks = KeyServer(vendor)
    ak = key_id(key.tpm["identity"]["ak"])

    def lease() -> tuple[dict, object]:
        req = client._signed_request(ks.challenge(lic.id)["nonce"], REQUEST_DOMAIN)
        return req, parse_quote(base64.b64decode(req["quote"]["attest"]))

    def floor() -> tuple:
        with vendor.engine.connect() as c:
            r = c.execute(sa.select(tpm_keys_t).where(tpm_keys_t.c.ak_id == ak)).one()
        return r.reset_count, r.clock, r.unsafe_reset

    def power_loss() -> None:  # no TPM2_Shutdown: the chip cannot have saved its clock
        swtpm.proc.send_signal(signal.SIGKILL)
        swtpm.proc.wait()
        swtpm.proc = None
        swtpm.start()
        monkeypatch.setenv(TCTI_ENV, swtpm.tcti)

    monkeypatch.setenv(TCTI_ENV, swtpm.tcti)
    req, q = lease()
    assert q.safe  # a fresh chip: its clock is safe
    assert ks.lease(req)["lease"]["ttl"] > 0
    boot = q.reset_count

    power_loss()
    req, q = lease()
    assert not q.safe and q.reset_count > boot  # what the chip says after losing power: a new boot, clock unsafe
    assert ks.lease(req)["lease"]["ttl"] > 0  # a boot not seen before: its clock starts a new floor
    assert floor()[0] == q.reset_count and floor()[2] == q.reset_count
    req, q2 = lease()
    assert not q2.safe and q2.reset_count == q.reset_count
    assert ks.lease(req)["lease"]["ttl"] > 0  # the rest of that boot goes on

    # The floor at this reset count set by a quote with a safe clock (before a power loss that the chip
    # did not count, or the state of a chip put back): the same reset count with an unsafe clock now
    # says the clock may have gone back. The (reset count, clock) order alone let it through.
    with vendor.engine.begin() as c:
        c.execute(tpm_keys_t.update().where(tpm_keys_t.c.ak_id == ak).values(unsafe_reset=None, clock=0))
    req, q3 = lease()
    assert not q3.safe and q3.reset_count == q.reset_count and q3.clock > 0
    with pytest.raises(LeaseDenied) as e:
        ks.lease(req)
    assert e.value.code == "tpm_rollback" and "not safe" in str(e.value)
    assert "not safe" in (vendor.root / "attestation.jsonl").read_text().splitlines()[-1]

    from tpm2_pytss import TPM2_SU

    with TpmAttestor(swtpm.tcti) as a:  # a clean reboot: the reset count moves on
        a.ctx.shutdown(TPM2_SU.CLEAR)
    swtpm.stop()
    swtpm.start()
    monkeypatch.setenv(TCTI_ENV, swtpm.tcti)
    req, q4 = lease()
    assert q4.reset_count > q.reset_count
    assert ks.lease(req)["lease"]["ttl"] > 0
    client.close()
    vendor.close()


def test_quotes_of_one_boot_arriving_out_of_order_are_not_a_rollback(swtpm, tmp_path, monkeypatch):
    """Two serving processes on one machine quote one after the other; the later request is leased first."""
    from vault.vaulthelp import bundle

    from codemoat.vault.keyserver import REORDER_MS

    vendor = Vendor.init(tmp_path / "vendor")
    key = tpm_machine(swtpm, vendor)
    monkeypatch.setenv(TCTI_ENV, swtpm.tcti)
    model = tmp_path / "m.gguf"
    write_gguf(model, 20_000)
    _, lic_path, _ = bundle(vendor, model, tmp_path / "out", key, mode="lease", keyserver="http://127.0.0.1:9", seats=2)
    lic = License.load(lic_path)
    one, two = LeaseClient(lic, key), LeaseClient(lic, key)  # two instances, one chip
    ks = KeyServer(vendor)
    first = one._signed_request(ks.challenge(lic.id)["nonce"], REQUEST_DOMAIN)
    second = two._signed_request(ks.challenge(lic.id)["nonce"], REQUEST_DOMAIN)
    c1 = parse_quote(base64.b64decode(first["quote"]["attest"])).clock
    assert parse_quote(base64.b64decode(second["quote"]["attest"])).clock > c1
    assert ks.lease(second)["lease"]["ttl"] > 0
    assert ks.lease(first)["lease"]["ttl"] > 0  # overtaken, same boot, a few ms older: refused as a rollback before
    # older than the window: still a rollback
    late = one._signed_request(ks.challenge(lic.id)["nonce"], REQUEST_DOMAIN)
    clock = parse_quote(base64.b64decode(late["quote"]["attest"])).clock
    with vendor.engine.begin() as c:
        c.execute(
            tpm_keys_t.update()
            .where(tpm_keys_t.c.ak_id == key_id(key.tpm["identity"]["ak"]))
            .values(clock=clock + REORDER_MS + 1)
        )
    with pytest.raises(LeaseDenied) as e:
        ks.lease(late)
    assert e.value.code == "tpm_rollback" and "went backwards" in str(e.value)
    one.close()
    two.close()
    vendor.close()
