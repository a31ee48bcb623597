"""One TPM2_ECDH_ZGen per offline start: the vendor wraps a TPM-bound license's content and watermark keys to one
ephemeral point (`tpmwrap.wrap_p256_shared`), each under its own context, and the start asks the chip for Z once
(`vault.tpmstart`: Z cached for that start only). ECDH_ZGen commands are counted on a real swtpm. An older license
(two points) still starts, with two; a license whose wraps share the point but not their contexts is refused."""

from __future__ import annotations

import json

import pytest

from attest.swtpm_fixture import *  # noqa: F403  (the swtpm fixtures; tests/ is on the path)

from codemoat.attest import AttestError, tpmcmd
from codemoat.attest.tpm import TAMPER_PCR, TpmAttestor
from codemoat.engines.sealed import open_sealed
from codemoat.vault.codec import VaultError
from test_prefault import _memfds
import test_tpm_start
from test_tpm_start import _build, older_license, resigned

tpm_offline = test_tpm_start.tpm_offline  # the fixture: a TPM machine and its offline license


def _zgens(monkeypatch) -> list[int]:
    """Count the TPM2_ECDH_ZGen commands sent to the chip (every raw command passes `Commands.call`)."""
    real, n = tpmcmd.Commands.call, [0]

    def counting(self, cc, *a, **kw):
        n[0] += cc == tpmcmd.CC_ECDH_ZGEN
        return real(self, cc, *a, **kw)

    monkeypatch.setattr(tpmcmd.Commands, "call", counting)
    return n


def _start(machine, moat, lic):
    holder = open_sealed(moat, lic, machine=machine, watch=False, build=_build)
    try:
        assert holder.get().buf.sealed
        return holder.watermark_key
    finally:
        holder.close()


def test_a_new_license_wraps_both_keys_to_one_point_and_its_start_sends_one_zgen(tpm_offline, vendor, monkeypatch):
    machine, moat, lic, _ = tpm_offline
    keys = json.loads(lic.read_text())["license"]["keys"]
    content, wm = keys["content_key"], keys["watermark_key"]
    assert content["epk"] == wm["epk"] and content["nonce"] != wm["nonce"] and content["ct"] != wm["ct"]
    zgens = _zgens(monkeypatch)
    got = _start(machine, moat, lic)
    assert zgens[0] == 1
    assert got == vendor.find_customer("acme").watermark_secret  # the watermark key, from that one Z


def test_an_older_license_with_one_point_per_key_still_starts_with_two_zgens(tpm_offline, vendor, monkeypatch):
    machine, moat, lic, lid = tpm_offline
    wm_key = older_license(vendor, machine, moat, lic, lid)
    zgens = _zgens(monkeypatch)
    assert _start(machine, moat, lic) == wm_key
    assert zgens[0] == 2


@pytest.mark.parametrize("edit", ["swapped", "watermark wrap copied from the content key's"])
def test_wraps_that_share_the_point_but_not_their_contexts_are_refused(tpm_offline, vendor, monkeypatch, edit):
    """The chip's Z is shared, the keys are not: each wrap opens only under its own context. A start that reused the
    first key for the second (a cache of unwrapped keys by point, not of Z) would serve the copied license with the
    content key as its watermark key."""
    machine, moat, lic, _ = tpm_offline
    keys = json.loads(lic.read_text())["license"]["keys"]
    if edit == "swapped":
        keys = {"content_key": keys["watermark_key"], "watermark_key": keys["content_key"]}
        want = "content key: cannot be unwrapped"
    else:
        keys = {"content_key": keys["content_key"], "watermark_key": dict(keys["content_key"])}
        want = "watermark key: cannot be unwrapped"
    resigned(vendor, lic, keys)
    zgens = _zgens(monkeypatch)
    before = set(_memfds())
    with pytest.raises(VaultError, match=want) as e:
        open_sealed(moat, lic, machine=machine, watch=False, build=_build)
    assert "\n" not in str(e.value)
    assert set(_memfds()) == before  # nothing decrypted is left
    assert zgens[0] == 1


def test_a_tamper_event_before_the_start_still_refuses_the_one_zgen(tpm_offline):
    machine, moat, lic, _ = tpm_offline
    with TpmAttestor(machine.tpm["tcti"]) as a:
        a.extend(TAMPER_PCR, b"chassis opened")
    with pytest.raises(AttestError, match="refused to unwrap") as e:
        open_sealed(moat, lic, machine=machine, watch=False, build=_build)
    assert "\n" not in str(e.value)
