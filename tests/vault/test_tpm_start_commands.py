"""What an offline start sends to the chip, counted on a real swtpm: every command costs the chip and the loopback
socket CPU time the start's page allocation and decryption compete for on a small machine (bench/attest.py,
offline start). And what it reads back: one answer per command, nothing after it."""

from __future__ import annotations

import pytest

from attest.swtpm_fixture import *  # noqa: F403  (the swtpm fixtures; tests/ is on the path)
from attest.tcti_proxy import TctiProxy

from codemoat.attest import tpmcmd
from codemoat.engines.sealed import open_sealed
from codemoat.errors import CodemoatError
from codemoat.vault.machine import TCTI_ENV
from test_prefault import _memfds
import test_tpm_start
from test_tpm_start import _build

tpm_offline = test_tpm_start.tpm_offline  # the fixture: a TPM machine and its offline license

NAMES = {v: k[3:] for k, v in vars(tpmcmd).items() if k.startswith("CC_")}


def _commands(monkeypatch) -> list[str]:
    """The raw commands sent to the chip, by name (every one passes `Commands.call`)."""
    real, sent = tpmcmd.Commands.call, []

    def recording(self, cc, *a, **kw):
        sent.append(NAMES.get(cc, hex(cc)))
        return real(self, cc, *a, **kw)

    monkeypatch.setattr(tpmcmd.Commands, "call", recording)
    return sent


def _start(machine, moat, lic) -> None:
    holder = open_sealed(moat, lic, machine=machine, watch=False, build=_build)
    try:
        assert holder.get().buf.sealed
    finally:
        holder.close()


def test_a_start_lets_the_chip_end_its_policy_session_with_the_one_zgen_and_leaves_none(tpm_offline, monkeypatch):
    """The ZGen of the last key to unwrap says continueSession = NO: the chip ends the session when it succeeds, so no
    TPM2_FlushContext follows. swtpm has no resource manager and three session slots: a session left behind by each
    start would refuse TPM2_StartAuthSession by the fourth, so five starts in a row serve."""
    machine, moat, lic, _ = tpm_offline
    sent = _commands(monkeypatch)
    _start(machine, moat, lic)
    assert sent == [
        "NV_READ_PUBLIC",  # the tamper latch is codemoat's
        "READ_PUBLIC",  # the persistent unwrap key is the license's
        "START_AUTH_SESSION",
        "POLICY_PCR",
        "POLICY_NV",
        "NV_CERTIFY",  # the CRL counter, certified by the AK
        "ECDH_ZGEN",  # after every other check passed: Z for both keys
    ]
    for _ in range(4):
        _start(machine, moat, lic)


def test_bytes_after_a_tpm_answer_are_refused_in_one_line(tpm_offline, swtpm, monkeypatch):
    """A man in the middle of the TCTI (the service account can put one there) that adds bytes after the chip's
    answer: one answer per command, so they are not the chip's; the start is refused, and nothing is left decrypted.
    (Read header first and then its body, they went unnoticed after the last answer of a connection.)"""
    machine, moat, lic, _ = tpm_offline
    proxy = TctiProxy(swtpm.port, lambda cc, cmd, resp: resp + b"\0\0\0\0" if cc == tpmcmd.CC_ECDH_ZGEN else resp)
    before = set(_memfds())
    try:
        monkeypatch.setenv(TCTI_ENV, proxy.tcti)
        with pytest.raises(CodemoatError, match="4 bytes after its end") as e:
            open_sealed(moat, lic, machine=machine, watch=False, build=_build)
        assert "\n" not in str(e.value)
    finally:
        proxy.close()
    assert set(_memfds()) == before
