"""The TPM's CRL counter read through a man in the middle of the TCTI (attest/tcti_proxy.py): the service account
points `CODEMOAT_TPM_TCTI` at a proxy to its own, real chip that passes every command on and answers the CRL
counter's TPM2_NV_Read with the count from before the revoking install. The unwrap still runs in the real chip
(ECDH_ZGen, its policy), so only the count is a lie; with the clock record and the CRL put back from a backup,
the revoked license served again. A real swtpm."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from attest.swtpm_fixture import *  # noqa: F403  (the swtpm fixtures; tests/ is on the path)
from attest.tcti_proxy import TctiProxy
from attest.tpmhelp import tpm_machine

from codemoat import paths
from codemoat.attest.tpm import CRL_NV_INDEX, TpmAttestor
from codemoat.attest.tpmcmd import CC_NV_READ
from codemoat.vault import crl, vendor_crl
from codemoat.vault.clock import ClockGuard
from codemoat.vault.codec import VaultError
from codemoat.vault.machine import TCTI_ENV
from codemoat.vault.verify import verify_bundle
from vaulthelp import bundle


def _crl_doc(vendor, **revoke) -> bytes:
    vendor_crl.revoke(vendor, **revoke)
    return json.dumps(vendor_crl.build(vendor)).encode()


def test_a_tcti_proxy_that_lies_about_the_crl_counter_does_not_bring_a_revoked_license_back(
    vendor, model, tmp_path, swtpm, monkeypatch
):
    machine = tpm_machine(swtpm, vendor)
    moat, lic, doc = bundle(vendor, model, tmp_path / "out", machine)
    assert verify_bundle(moat, lic)["ok"]  # trusts the vendor's key
    crl.install(_crl_doc(vendor, machines=["m_other"], reason="lost"))
    home, guard = paths.home(), ClockGuard(machine)
    backup = tmp_path / "backup"
    shutil.copytree(home, backup)  # from before the revocation: clock record and CRL
    with TpmAttestor(swtpm.tcti) as a:
        then = a.crl_count()
    crl.install(_crl_doc(vendor, licenses=[doc["license"]["id"]], reason="unpaid"))
    with pytest.raises(VaultError, match="unpaid"):
        verify_bundle(moat, lic)
    shutil.copy2(backup / "clock.json", guard.path)
    installed = crl.installed_path(doc["license"]["vendor_key"])
    shutil.copy2(backup / "crl" / installed.name, installed)
    with pytest.raises(VaultError, match="older than this machine's TPM"):  # the chip itself says so
        verify_bundle(moat, lic)

    passed = []

    def old_count(cc: int, cmd: bytes, resp: bytes) -> bytes:
        passed.append(cc)
        if cc == CC_NV_READ and struct.unpack_from(">I", cmd, 10)[0] == CRL_NV_INDEX and resp[6:10] == b"\0\0\0\0":
            return resp[:16] + then.to_bytes(8, "big") + resp[24:]  # TPM2B_MAX_NV_BUFFER's 8 bytes: the old count
        return resp

    proxy = TctiProxy(swtpm.port, old_count)
    try:
        monkeypatch.setenv(TCTI_ENV, proxy.tcti)
        with pytest.raises(VaultError, match="older than this machine's TPM") as e:
            verify_bundle(moat, lic)
        assert "\n" not in str(e.value)
        assert passed  # the check went through the proxy
    finally:
        proxy.close()
