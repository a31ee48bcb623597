"""The TPM's part of an offline start runs on one connection in a thread beside the other checks
(vault.tpmstart): the CRL install counter and the unwraps share the connection, the chip hands out a key
only once every other check passed, and the watermark key's unwrap, which a start finishes while it
decrypts, still refuses the start when the chip refuses it (a real swtpm per test)."""

from __future__ import annotations

import json
import time

import pytest

from attest.swtpm_fixture import *  # noqa: F403  (the swtpm fixtures; tests/ is on the path)
from attest.tpmhelp import tpm_machine

from codemoat.attest import AttestError
from codemoat.attest.tpm import TAMPER_PCR, TpmAttestor
from codemoat.attest.tpmraw import StartChip
from codemoat.engines.sealed import open_sealed
from codemoat.vault import crl, vendor_crl
from codemoat.vault.clock import ClockGuard
from codemoat.vault.codec import VaultError, b64e, canonical, sign
from codemoat.vault.container import SealedFile
from codemoat.vault.license import DOMAIN, License, check, key_context
from codemoat.vault.tpmwrap import wrap_p256
from codemoat.vault.verify import verify_bundle
from ggufs import write_gguf
from test_prefault import _Held, _memfds
from vaulthelp import bundle


def _build(_s, buf, _id, _parts):
    return _Held(buf)


@pytest.fixture
def tpm_offline(vendor, tmp_path, swtpm):
    """A TPM machine, an offline license bound to its chip, opened once, and a CRL installed (the chip counts it)."""
    model = tmp_path / "m.gguf"
    write_gguf(model, 300_000)
    machine = tpm_machine(swtpm, vendor)
    moat, lic, doc = bundle(vendor, model, tmp_path / "out", machine)
    assert doc["license"]["machines"][0]["binding"] == "tpm"
    assert verify_bundle(moat, lic)["ok"]
    vendor_crl.revoke(vendor, machines=["m_someone_else"], reason="lost")
    crl.install(json.dumps(vendor_crl.build(vendor)).encode())
    return machine, moat, lic, doc["license"]["id"]


def _count(monkeypatch, name: str) -> list[int]:
    """Count calls of StartChip.`name`, what a start opens (the real method still runs)."""
    real, n = getattr(StartChip, name), [0]

    def counting(self, *a, **kw):
        n[0] += 1
        return real(self, *a, **kw)

    monkeypatch.setattr(StartChip, name, counting)
    return n


def test_an_offline_start_reads_the_crl_counter_and_unwraps_on_one_tpm_connection(tpm_offline, monkeypatch):
    machine, moat, lic, _ = tpm_offline
    opened, counted = _count(monkeypatch, "__enter__"), _count(monkeypatch, "crl_count")
    holder = open_sealed(moat, lic, machine=machine, watch=False, build=_build)
    try:
        assert holder.get().buf.sealed
    finally:
        holder.close()
    assert counted[0] == 1  # the CRL check asked the chip for its install counter...
    assert opened[0] == 1  # ...on the connection the unwraps used (two before: the CRL check opened its own)


@pytest.mark.parametrize("refusal", ["revoked", "another model"])
def test_a_license_refused_by_a_check_gets_no_key_out_of_the_chip(tpm_offline, vendor, tmp_path, monkeypatch, refusal):
    """The chip's part starts before the other checks run; it may derive the unwrap key, but TPM2_ECDH_ZGen runs
    only once every check passed."""
    machine, moat, lic, lid = tpm_offline
    if refusal == "revoked":
        vendor_crl.revoke(vendor, licenses=[lid], reason="unpaid")
        crl.install(json.dumps(vendor_crl.build(vendor)).encode())
        want = "unpaid"
    else:
        other = tmp_path / "o.gguf"
        write_gguf(other, 1000)
        moat = bundle(vendor, other, tmp_path / "other", machine, customer="acme2")[0]
        want = "license is for another model"
    zgen = _count(monkeypatch, "zgen")
    with pytest.raises(VaultError, match=want):
        open_sealed(moat, lic, machine=machine, watch=False, build=_build)
    with pytest.raises(VaultError, match=want):
        check(License.load(lic), SealedFile(moat), machine, ClockGuard(machine))
    assert zgen[0] == 0
    with TpmAttestor(machine.tpm["tcti"]) as a:  # the thread gave the connection back
        assert a.crl_count() is not None


def test_the_watermark_key_unwrapped_during_the_decryption_is_the_license_s(tpm_offline):
    machine, moat, lic, _ = tpm_offline
    whole = check(License.load(lic), SealedFile(moat), machine, ClockGuard(machine))  # both keys before it returns
    assert whole.watermark_key is not None and whole.pending is None
    holder = open_sealed(moat, lic, machine=machine, watch=False, build=_build)
    try:
        assert holder.watermark_key == whole.watermark_key
    finally:
        holder.close()


def resigned(vendor, lic, keys: dict) -> None:
    """`lic` with other wrapped keys, signed again by the vendor (what a vendor's bug, not an attacker, could make:
    the signature otherwise refuses any edit first)."""
    doc = json.loads(lic.read_text())
    body = doc["license"]
    body["keys"] = keys
    doc["signature"] = b64e(sign(vendor.signing_key, DOMAIN, canonical(body)))
    lic.write_text(json.dumps(doc))


def older_license(vendor, machine, moat, lic, lid) -> bytes:
    """`lic` as the vendor wrapped its keys before session 12: one ephemeral point per key, so a start asks the chip
    for two ECDH_ZGens. Returns its watermark key."""
    unwrap = machine.tpm["identity"]["unwrap"]
    wm_key = vendor.find_customer("acme").watermark_secret
    content_key = vendor.content_key(SealedFile(moat).manifest.file_id)
    resigned(
        vendor,
        lic,
        {
            "content_key": wrap_p256(unwrap, content_key, key_context("content-key", lid)),
            "watermark_key": wrap_p256(unwrap, wm_key, key_context("watermark-key", lid)),
        },
    )
    return wm_key


def test_a_tamper_event_between_the_two_unwraps_refuses_the_start(tpm_offline, vendor, monkeypatch):
    """The chip refuses the watermark key (a PCR extended after the content key came out): the start that was
    decrypting meanwhile is refused in one line, and serves nothing. An older license (one point per key: two
    ZGens); a newer one asks the chip once for both keys (tests/vault/test_tpm_one_zgen.py), so there is no
    "between" (a tamper event after a start's unwrap stops nothing already serving, offline, either)."""
    machine, moat, lic, lid = tpm_offline
    older_license(vendor, machine, moat, lic, lid)
    real = StartChip.zgen

    def tampered_after_first(self, policy, point, keep=True):
        out = real(self, policy, point, keep)
        self.idle()  # the swtpm's one connection, for the tamper handler's
        with TpmAttestor(self.tcti) as a:
            a.extend(TAMPER_PCR, b"chassis opened")
        return out

    monkeypatch.setattr(StartChip, "zgen", tampered_after_first)
    before = set(_memfds())
    with pytest.raises(AttestError, match="refused to unwrap") as e:
        open_sealed(moat, lic, machine=machine, watch=False, build=_build)
    assert "\n" not in str(e.value)
    assert set(_memfds()) == before  # the decrypted memfd was zeroed and closed


@pytest.mark.parametrize("hold", [0.0, 5.0])
def test_the_parked_connection_is_held_or_given_back_and_the_start_serves_either_way(tpm_offline, monkeypatch, hold):
    """The thread holds the chip's one connection while the caller finishes its checks (`tpmstart.HOLD_S`), then
    gives it back; release() then unwraps on a new one. Either way the start serves, on one connection when held."""
    from codemoat.attest.tpmsock import SwtpmSocket
    from codemoat.vault import tpmstart

    machine, moat, lic, _ = tpm_offline
    monkeypatch.setattr(tpmstart, "HOLD_S", hold)
    real, connects = SwtpmSocket._connect, [0]

    def counting(self):
        connects[0] += 1
        return real(self)

    monkeypatch.setattr(SwtpmSocket, "_connect", counting)
    late = tpmstart.TpmStart.release

    def slow_release(self):  # checks that take longer than a hold of 0 s: the thread has given it back by then
        time.sleep(0.05)
        late(self)

    monkeypatch.setattr(tpmstart.TpmStart, "release", slow_release)
    holder = open_sealed(moat, lic, machine=machine, watch=False, build=_build)
    try:
        assert holder.get().buf.sealed and holder.watermark_key is not None
    finally:
        holder.close()
    assert connects[0] == (2 if hold == 0.0 else 1)
    with TpmAttestor(machine.tpm["tcti"]) as a:  # given back once the start is done
        assert a.crl_count() is not None
