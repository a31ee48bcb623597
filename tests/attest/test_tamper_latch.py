"""A tamper event outlives a reboot (a real swtpm power-cycled): the tamper PCR is reset, but the NV
tamper latch the unwrap policy names still counts the event, so neither the offline license nor a
lease opens until the vendor reprovisions; deleting and re-creating the latch (owner authorization)
(or TPM2_Clear) does not set it back."""

from __future__ import annotations

import json
import time

import pytest

from codemoat.attest.tpm import TAMPER_NV_INDEX, TAMPER_PCR, TpmAttestor
from codemoat.errors import CodemoatError
from codemoat.vault.keyserver import DOC_TTL, LeaseDenied
from codemoat.vault.lease import LeaseClient
from codemoat.vault.license import License
from codemoat.vault.machine import TCTI_ENV, MachineKey
from codemoat.vault.reprovision import reprovision
from codemoat.vault.vendor import Vendor
from codemoat.vault.verify import verify_bundle
from ggufs import write_gguf

from .tpmhelp import bind, keyserver_process, tpm_machine


@pytest.mark.slow
def test_a_tamper_event_survives_a_reboot_until_the_vendor_reprovisions(swtpm, tmp_path, monkeypatch):
    from tpm2_pytss import ESYS_TR, TPM2_SU
    from vault.vaulthelp import bundle

    vendor = Vendor.init(tmp_path / "vendor")
    key = tpm_machine(swtpm, vendor)
    monkeypatch.setenv(TCTI_ENV, swtpm.tcti)
    provisioned = key.tpm["identity"]["policy"]["latch"]
    assert provisioned["index"] == TAMPER_NV_INDEX
    model = tmp_path / "m.gguf"
    write_gguf(model, 20_000)

    def reboot() -> None:  # an orderly power cycle: TPM2_Shutdown, stop, TPM2_Startup(CLEAR) resets the PCRs
        with TpmAttestor(swtpm.tcti) as a:
            a.ctx.shutdown(TPM2_SU.CLEAR)
        swtpm.stop()
        swtpm.start()
        monkeypatch.setenv(TCTI_ENV, swtpm.tcti)

    with keyserver_process(vendor.root) as url:
        moat, offline, _ = bundle(vendor, model, tmp_path / "off", key)
        _, leased, _ = bundle(vendor, model, tmp_path / "lease", key, mode="lease", keyserver=url, lease_ttl=30, grace=5)
        verify_bundle(moat, offline, machine=key)
        client = LeaseClient(License.load(leased), key)
        assert client.acquire().content_key == vendor.content_key(License.load(leased).model["file_id"])

        with TpmAttestor(swtpm.tcti) as a:  # what `codemoat appliance tamper-event` does
            assert a.tamper(TAMPER_PCR, b"codemoat-tamper-v1\x00chassis opened") == provisioned["count"] + 1
        with pytest.raises(CodemoatError, match="tamper latch"):
            verify_bundle(moat, offline, machine=key)
        with pytest.raises(LeaseDenied) as e:
            client.acquire()
        assert e.value.code == "pcr_mismatch"

        reboot()
        with TpmAttestor(swtpm.tcti) as a:
            assert a.pcr_values([TAMPER_PCR]) == [bytes(32)]  # the reboot did reset the tamper PCR
        with pytest.raises(CodemoatError, match="tamper latch has counted a tamper event"):
            verify_bundle(moat, offline, machine=key)  # ...but the latch still says what happened
        with pytest.raises(CodemoatError, match="tamper latch"):  # the quote holds again, the chip still will not unwrap
            client.acquire()

        # someone with owner authorization deletes the latch and makes it again: a new NV counter
        # starts above the highest count this chip has held, never at the provisioned one
        with TpmAttestor(swtpm.tcti) as a:
            a.ctx.nv_undefine_space(a.ctx.tr_from_tpmpublic(TAMPER_NV_INDEX), ESYS_TR.OWNER)
        with pytest.raises(CodemoatError, match="no tamper latch"):
            verify_bundle(moat, offline, machine=key)
        with TpmAttestor(swtpm.tcti) as a:
            assert a.tamper_count() > provisioned["count"]
            a.ctx.clear(ESYS_TR.LOCKOUT)  # TPM2_Clear (lockout authorization, often empty too): owner NV is gone
            assert a._counter(TAMPER_NV_INDEX, create=False, what="tamper latch") is None
            assert a.tamper_count() > provisioned["count"]  # a latch made after it still starts above
        reboot()
        # TPM2_Clear took the CRL counter the license names too: the start is refused before the unwrap (vault.crl)
        with pytest.raises(CodemoatError, match="TPM has no CRL counter, but license"):
            verify_bundle(moat, offline, machine=key)
        with TpmAttestor(swtpm.tcti) as a:  # ...and the chip itself still will not unwrap
            from codemoat.vault.license import key_context
            from codemoat.vault.tpmwrap import unwrap_p256

            body, t = License.load(offline).body, key.tpm["identity"]
            with pytest.raises(CodemoatError, match="tamper latch has counted a tamper event"):
                unwrap_p256(
                    lambda p: a.zgen(t["policy"], p),
                    t["unwrap"],
                    body["keys"]["content_key"],
                    key_context("content-key", body["id"]),
                    "content key",
                )
        with pytest.raises(CodemoatError, match="tamper latch|went backwards"):  # TPM2_Clear also reset the TPM clock
            client.acquire()

        # the vendor binds the cleared chip again (its clock floor starts over) and reprovisions both
        # licenses with the chip's state now (new latch count)
        bind(vendor, key, swtpm.ca)
        fresh = dict(MachineKey.load().identity(), tpm=key.enable_tpm(swtpm.tcti, [TAMPER_PCR]))
        assert fresh["tpm"]["policy"]["latch"]["count"] > provisioned["count"]
        for lic in (offline, leased):
            lic.write_text(json.dumps(reprovision(vendor, License.load(lic).id, fresh)))
        verify_bundle(moat, offline, machine=MachineKey.load())
        time.sleep(DOC_TTL + 0.5)  # the key server reads the reprovisioned license again within DOC_TTL
        assert client.acquire().content_key == vendor.content_key(License.load(leased).model["file_id"])
        client.close()
    vendor.close()
