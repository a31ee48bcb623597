"""The unwrap key and the AK made persistent by `machine-id --tpm` (TPM2_EvictControl), so an offline start reads
them (TPM2_ReadPublic) instead of deriving them (TPM2_CreatePrimary): the key found at the handle is used only when
it is the license's, and a chip that lost it (evicted, cleared) is handled as before. A real swtpm per test."""

from __future__ import annotations

import pytest

from attest.swtpm_fixture import *  # noqa: F403  (the swtpm fixtures; tests/ is on the path)
from attest.tpmhelp import tpm_machine

from codemoat.attest.tpm import AK_HANDLE, UNWRAP_HANDLE, TpmAttestor, _pt
from codemoat.attest.tpmcmd import AK_TEMPLATE, CC_CREATE_PRIMARY, CC_ECDH_ZGEN, CC_NV_CERTIFY, Commands, unwrap_template
from codemoat.attest.tpmraw import StartChip
from codemoat.engines.sealed import open_sealed
from codemoat.errors import CodemoatError
from codemoat.vault.verify import verify_bundle
from test_prefault import _Held
from vaulthelp import bundle


def _build(_s, buf, _id, _parts):
    return _Held(buf)


def _sent(monkeypatch) -> list[tuple[int, tuple[int, ...]]]:
    """Every (command code, handles) `tpmcmd` sends (the real command still runs)."""
    real, got = Commands.call, []

    def recording(self, cc, handles=(), *a, **kw):
        got.append((cc, tuple(handles)))
        return real(self, cc, handles, *a, **kw)

    monkeypatch.setattr(Commands, "call", recording)
    return got


def _start(moat, lic, machine):
    holder = open_sealed(moat, lic, machine=machine, watch=False, build=_build)
    try:
        return holder.watermark_key
    finally:
        holder.close()


def test_the_hand_made_templates_are_the_ones_tpm2_pytss_marshals():
    pt = _pt()
    A = pt.TPMA_OBJECT
    base = A.FIXEDTPM | A.FIXEDPARENT | A.SENSITIVEDATAORIGIN
    unwrap = pt.TPM2B_PUBLIC.parse("ecc256", objectAttributes=base | A.DECRYPT, authPolicy=b"\x11" * 32)
    assert unwrap.publicArea.marshal() == unwrap_template(b"\x11" * 32) + b"\0\0\0\0"
    ak = pt.TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=base | A.USERWITHAUTH | A.RESTRICTED | A.SIGN_ENCRYPT)
    ak.publicArea.parameters.eccDetail.symmetric.algorithm = pt.TPM2_ALG.NULL  # as TpmAttestor._ak makes it
    assert ak.publicArea.marshal() == AK_TEMPLATE + b"\0\0\0\0"


def test_machine_id_makes_both_keys_persistent_and_a_start_derives_none(vendor, model, tmp_path, swtpm, monkeypatch):
    machine = tpm_machine(swtpm, vendor)
    moat, lic, _ = bundle(vendor, model, tmp_path / "out", machine)
    sent = _sent(monkeypatch)
    assert _start(moat, lic, machine) is not None
    codes = [cc for cc, _ in sent]
    assert CC_CREATE_PRIMARY not in codes  # neither key derived again...
    # one ZGen for both keys (wrapped to one point: tests/vault/test_tpm_one_zgen.py), by the persistent key
    assert [h[0] for cc, h in sent if cc == CC_ECDH_ZGEN] == [UNWRAP_HANDLE]
    assert [h[0] for cc, h in sent if cc == CC_NV_CERTIFY] == [AK_HANDLE]  # ...the persistent ones answered


def _put_at(a: TpmAttestor, handle: int, template: bytes) -> None:
    """An attacker with owner authorization evicts what is at `handle` and persists there a key of the same template
    made in the owner hierarchy: the same shape and policy, another key (so another TPM name)."""
    pt = _pt()
    c = a.ctx
    c.evict_control(pt.ESYS_TR.OWNER, c.tr_from_tpmpublic(handle), handle)
    tmpl, _ = pt.TPM2B_PUBLIC.unmarshal(len(template + b"\0\0\0\0").to_bytes(2, "big") + template + b"\0\0\0\0")
    h, *_ = c.create_primary(None, tmpl, pt.ESYS_TR.OWNER)
    c.evict_control(pt.ESYS_TR.OWNER, h, handle)
    c.flush_context(h)


@pytest.mark.parametrize("at_ak", ["signing key", "decryption key"])
def test_another_key_of_the_same_shape_at_the_persistent_handles_is_never_used(
    vendor, model, tmp_path, swtpm, monkeypatch, at_ak
):
    """The attacker's keys at both handles: the start checks the unwrap key's public area against the license's key
    (so its name) and the AK's signature against the license's AK (a key that cannot sign there: the chip refuses
    the NV_Certify), derives the real keys instead, and serves."""
    machine = tpm_machine(swtpm, vendor)
    moat, lic, _ = bundle(vendor, model, tmp_path / "out", machine)
    want = _start(moat, lic, machine)
    policy = machine.tpm["identity"]["policy"]
    with TpmAttestor(swtpm.tcti) as a:
        _put_at(a, UNWRAP_HANDLE, unwrap_template(a.policy_digest(policy)))
        _put_at(a, AK_HANDLE, AK_TEMPLATE if at_ak == "signing key" else unwrap_template(b""))
    sent = _sent(monkeypatch)
    assert _start(moat, lic, machine) == want
    zgen = [h[0] for cc, h in sent if cc == CC_ECDH_ZGEN]
    assert len(zgen) == 1 and UNWRAP_HANDLE not in zgen  # the impostor never did an ECDH


def test_a_start_without_persistent_keys_derives_them_as_before(vendor, model, tmp_path, swtpm, monkeypatch):
    """An identity made before the keys were persistent (or an owner who evicted them): the start still serves."""
    machine = tpm_machine(swtpm, vendor)
    moat, lic, _ = bundle(vendor, model, tmp_path / "out", machine)
    pt = _pt()
    with TpmAttestor(swtpm.tcti) as a:
        for handle in (UNWRAP_HANDLE, AK_HANDLE):
            a.ctx.evict_control(pt.ESYS_TR.OWNER, a.ctx.tr_from_tpmpublic(handle), handle)
    sent = _sent(monkeypatch)
    assert _start(moat, lic, machine) is not None
    assert [cc for cc, _ in sent].count(CC_CREATE_PRIMARY) == 2  # the AK for the CRL counter, the unwrap key


def test_a_chip_cleared_since_provisioning_refuses_the_start_in_one_line(vendor, model, tmp_path, swtpm):
    machine = tpm_machine(swtpm, vendor)
    moat, lic, _ = bundle(vendor, model, tmp_path / "out", machine)
    assert verify_bundle(moat, lic)["ok"]
    pt = _pt()
    with TpmAttestor(swtpm.tcti) as a:
        a.ctx.clear(pt.ESYS_TR.LOCKOUT)  # TPM2_Clear: owner NV and the persistent keys are gone
    with StartChip(swtpm.tcti) as c:
        assert c._persistent_unwrap(unwrap_template(c.policy_digest(machine.tpm["identity"]["policy"]))) is None
    with pytest.raises(CodemoatError) as e:
        _start(moat, lic, machine)
    assert "\n" not in str(e.value) and "CRL counter" in str(e.value)


def test_a_swtpm_that_closes_the_connection_after_each_answer_still_serves_a_start(vendor, model, tmp_path, swtpm):
    """`swtpm socket --server ...,disconnect`: the start's connection per burst is closed after every answer; each
    command sent on it again on a new connection (it was never read), so the start serves as with any swtpm."""
    import subprocess
    import time

    from attest.swtpm_fixture import _free_pair, _listening

    machine = tpm_machine(swtpm, vendor)
    moat, lic, _ = bundle(vendor, model, tmp_path / "out", machine)
    want = _start(moat, lic, machine)
    swtpm.stop()
    port = _free_pair()
    args = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={swtpm.state}", "--flags", "not-need-init,startup-clear"]
    args += ["--server", f"type=tcp,port={port},bindaddr=127.0.0.1,disconnect"]
    proc = subprocess.Popen(args + ["--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1"])
    try:
        deadline = time.time() + 10
        while not _listening(port) and time.time() < deadline:
            time.sleep(0.02)
        machine.tpm["tcti"] = f"swtpm:host=127.0.0.1,port={port}"
        assert _start(moat, lic, machine) == want
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_lease_quotes_and_unwraps_with_the_persistent_keys(vendor, model, tmp_path, swtpm, keyserver, monkeypatch):
    """A lease (serve's first, every renewal) quotes with the persistent AK and unwraps with the persistent unwrap
    key: no CreatePrimary per renewal. Another key put at the AK's handle is not used: the AK is derived, and the
    key server still takes the quote."""
    from codemoat.vault.lease import LeaseClient
    from codemoat.vault.license import License

    machine = tpm_machine(swtpm, vendor)
    _, lic, _ = bundle(vendor, model, tmp_path / "out", machine, mode="lease", keyserver=keyserver.url, lease_ttl=10, grace=5)
    client = LeaseClient(License.load(lic), machine)
    real, derived = TpmAttestor._ak, []

    def counting(self):
        derived.append(1)
        return real(self)

    monkeypatch.setattr(TpmAttestor, "_ak", counting)
    want = vendor.content_key(License.load(lic).model["file_id"])
    try:
        sent = _sent(monkeypatch)
        assert client.acquire().content_key == want
        assert CC_CREATE_PRIMARY not in [cc for cc, _ in sent] and derived == []
        assert [h[0] for cc, h in sent if cc == CC_ECDH_ZGEN] == [UNWRAP_HANDLE]
        with TpmAttestor(swtpm.tcti) as a:
            _put_at(a, AK_HANDLE, AK_TEMPLATE)
        assert client.acquire().content_key == want
        assert derived == [1]
    finally:
        client.close()
