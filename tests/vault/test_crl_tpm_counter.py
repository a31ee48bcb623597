"""The TPM's CRL counter is named in the license (vault.crl): `machine-id --tpm` defines it, the vendor signs its
count into the machine's TPM block, and the clock record follows it from there. Attacker's case (the owner, with
the default empty owner authorization, and the service account's files): delete the counter, put back a clock
record from before the first CRL install, delete the installed CRL. Before, a chip that never had the counter and
one that lost it looked alike, and the revoked license served again. A real swtpm per test."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from attest.swtpm_fixture import *  # noqa: F403  (the swtpm fixtures; tests/ is on the path)
from attest.tpmhelp import tpm_machine

from codemoat import paths
from codemoat.attest.tpm import CRL_NV_INDEX, TpmAttestor, _pt
from codemoat.vault import crl, vendor_crl
from codemoat.vault.clock import ClockGuard
from codemoat.vault.codec import VaultError, b64e, canonical, sign
from codemoat.vault.license import DOMAIN
from codemoat.vault.verify import verify_bundle
from vaulthelp import bundle


def _crl_doc(vendor, **revoke) -> bytes:
    if revoke:
        vendor_crl.revoke(vendor, **revoke)
    return json.dumps(vendor_crl.build(vendor)).encode()


def _delete_counter(tcti: str) -> None:
    with TpmAttestor(tcti) as a:  # what tpm2_nvundefine does
        a.ctx.nv_undefine_space(a.ctx.tr_from_tpmpublic(CRL_NV_INDEX), _pt().ESYS_TR.OWNER)
        assert a.crl_count() is None


def _record_from_before_any_install(guard: ClockGuard) -> None:
    """A validly tagged clock record with no CRL entry at all (as one from before provisioning)."""
    hwm = json.loads(guard.path.read_text())["hwm"]
    guard.path.write_text(json.dumps({"hwm": hwm, "mac": guard._mac(hwm)}))
    assert guard.crl_number(crl.TPM_COUNT) is None


@pytest.fixture
def revoked(vendor, model, tmp_path, swtpm):
    """A TPM machine whose offline license names the CRL counter, an old CRL (not revoking it) kept aside, then a
    newer one revoking it installed."""
    machine = tpm_machine(swtpm, vendor)
    moat, lic, doc = bundle(vendor, model, tmp_path / "out", machine)
    assert verify_bundle(moat, lic)["ok"]  # no CRL installed yet: the chip is still at the licensed count
    old = _crl_doc(vendor, machines=["m_other"], reason="lost")
    crl.install(old)
    crl.install(_crl_doc(vendor, licenses=[doc["license"]["id"]], reason="unpaid"))
    with pytest.raises(VaultError, match="unpaid"):
        verify_bundle(moat, lic)
    return machine, moat, lic, old


def test_a_deleted_counter_with_a_clock_record_from_before_the_first_install_is_refused(revoked, swtpm):
    machine, moat, lic, _ = revoked
    _record_from_before_any_install(ClockGuard(machine))
    shutil.rmtree(paths.home() / "crl")
    _delete_counter(swtpm.tcti)
    with pytest.raises(VaultError, match="TPM has no CRL counter, but license .* names it, defined at provisioning") as e:
        verify_bundle(moat, lic)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("how", ["install", "machine-id"])
def test_a_counter_defined_again_does_not_let_an_old_crl_back(revoked, swtpm, how):
    """The attacker goes on: defines the counter again (an install of the old CRL does, so does `machine-id --tpm`),
    so the chip has one and the record matches it. The new counter starts above every count the chip held, so
    the record's base is above the count the license names: refused."""
    machine, moat, lic, old = revoked
    guard = ClockGuard(machine)
    _record_from_before_any_install(guard)
    shutil.rmtree(paths.home() / "crl")
    _delete_counter(swtpm.tcti)
    if how == "install":
        crl.install(old)
    else:
        machine.enable_tpm(swtpm.tcti, machine.tpm["identity"]["policy"]["pcrs"])
    assert guard.crl_number(crl.TPM_COUNT) is not None
    with pytest.raises(VaultError, match="CRL counter was defined again after license"):
        verify_bundle(moat, lic)


def test_a_clock_record_from_before_the_first_install_with_the_counter_kept_is_refused(revoked):
    machine, moat, lic, old = revoked
    _record_from_before_any_install(ClockGuard(machine))
    shutil.rmtree(paths.home() / "crl")
    with pytest.raises(VaultError, match="older than this machine's TPM"):
        verify_bundle(moat, lic)
    with pytest.raises(VaultError, match="older than this machine's TPM"):
        crl.install(old)


def test_a_license_from_a_later_machine_id_names_the_count_then_and_starts(revoked, vendor, tmp_path, swtpm):
    """A license issued from a later `machine-id --tpm` (a reprovision, a new license) names the counter's count then:
    the record's base from provisioning is below it, which is no refusal, and the record is not moved."""
    machine, moat, lic, _ = revoked
    named = json.loads(lic.read_text())["license"]["machines"][0]["tpm"]["crl"]
    guard = ClockGuard(machine)
    base = guard.crl_number(crl.TPM_BASE)
    assert named == {"index": CRL_NV_INDEX, "count": base}
    crl.install(_crl_doc(vendor, machines=["m_third"], reason="lost"))  # one more install: the chip counts on
    recorded = guard.crl_number(crl.TPM_COUNT)
    machine.enable_tpm(swtpm.tcti, machine.tpm["identity"]["policy"]["pcrs"])
    assert (guard.crl_number(crl.TPM_BASE), guard.crl_number(crl.TPM_COUNT)) == (base, recorded)
    moat2, lic2, doc2 = bundle(vendor, tmp_path / "m.gguf", tmp_path / "again", machine, customer="acme2")
    assert doc2["license"]["machines"][0]["tpm"]["crl"]["count"] > base
    assert verify_bundle(moat2, lic2)["ok"]


def test_an_old_license_naming_no_counter_still_loads_with_a_warning(vendor, model, tmp_path, swtpm, caplog):
    machine = tpm_machine(swtpm, vendor)
    moat, lic, doc = bundle(vendor, model, tmp_path / "out", machine)
    body = doc["license"]
    del body["machines"][0]["tpm"]["crl"]  # as a license issued before the counter was named
    doc["signature"] = b64e(sign(vendor.signing_key, DOMAIN, canonical(body)))
    lic.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="codemoat.vault"):
        assert verify_bundle(moat, lic)["ok"]
    said = [r.getMessage() for r in caplog.records if "names no TPM CRL counter" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0] and body["id"] in said[0]


def test_the_vendor_refuses_a_tpm_identity_that_names_no_counter(vendor, model, tmp_path, swtpm):
    machine = tpm_machine(swtpm, vendor)
    ident = machine.identity()
    del ident["tpm"]["crl"]
    vendor.seal(model, "acme", tmp_path / "a.moat")
    with pytest.raises(VaultError, match="names no CRL counter .* machine-id --tpm"):
        vendor.issue_license(customer="acme", model=tmp_path / "a.moat", machines=[ident], expires=2_000_000_000)


def test_an_identity_that_claims_a_higher_count_than_the_chip_had_is_not_licensed(vendor, model, tmp_path, swtpm):
    """The customer edits `machine-id --tpm`'s output before sending it: the CRL counter's count one higher than the
    chip's, which the vendor signed into the license. A start takes that count as 'nothing installed since' when the
    clock record names none, so after a revoking install brought the chip up to it, a clock record from before the
    first install (and no CRL folder) matched the chip and the revoked license served again (checked on the code
    before: it did). The identity now carries the AK's TPM2_NV_Certify of the count: the vendor refuses an edited one,
    and one certifying another NV index."""
    machine = tpm_machine(swtpm, vendor)
    ident = machine.identity()
    assert "crl_certify" in ident["tpm"]
    for edit in (
        lambda t: t["crl"].update(count=t["crl"]["count"] + 1),
        lambda t: t.pop("crl_certify"),
        lambda t: t["crl"].update(index=CRL_NV_INDEX + 1),
    ):
        edited = json.loads(json.dumps(ident))
        edit(edited["tpm"])

        class Claimed:
            def identity(self):
                return edited

        with pytest.raises(VaultError, match="identity names CRL counter count|lacks its AK's certification of the TPM CRL") as e:
            bundle(vendor, model, tmp_path / "out", Claimed())
        assert "\n" not in str(e.value)
    assert bundle(vendor, model, tmp_path / "out", machine)[2]  # the identity as machine-id made it


def test_an_identity_whose_tamper_latch_count_is_ahead_of_the_chip_is_not_licensed(vendor, model, tmp_path, swtpm, monkeypatch):
    """The same with the tamper latch: a modified `machine-id --tpm` makes its unwrap key for a policy whose latch
    count is one ahead of the chip's (the chip makes any template, and the AK certifies that key). Such a license
    does not unwrap until the chip's latch reaches that count, and then unwraps after a tamper event and a reboot:
    the one tamper event the latch is there to remember. The identity now carries the AK's TPM2_NV_Certify of the
    latch, and the vendor refuses a policy naming another count."""
    machine = tpm_machine(swtpm, vendor)
    real = TpmAttestor.current_policy

    def ahead(self, pcrs):
        p = real(self, pcrs)
        p["latch"]["count"] += 1
        return p

    monkeypatch.setattr(TpmAttestor, "current_policy", ahead)
    with TpmAttestor(swtpm.tcti) as a:
        block = a.identity(machine.tpm["identity"]["policy"]["pcrs"])
    monkeypatch.setattr(TpmAttestor, "current_policy", real)
    ident = machine.identity()
    assert block["ak"] == ident["tpm"]["ak"]  # the bound AK certified this unwrap key
    ident["tpm"] = {k: v for k, v in block.items() if k != "latch_certify"} | {"crl": ident["tpm"]["crl"]}
    for tpm in (ident["tpm"], block | {"crl": ident["tpm"]["crl"]}):  # without the latch's certification, and with it

        class Claimed:
            def identity(self, tpm=tpm):
                return dict(ident, tpm=tpm)

        with pytest.raises(VaultError, match="tamper latch") as e:
            bundle(vendor, model, tmp_path / "out", Claimed())
        assert "\n" not in str(e.value)
