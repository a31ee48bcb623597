"""The unwrap's policy session is kept for the next unwrap on the same TPM connection (a start unwraps the content
and the watermark key: two TPM commands fewer), and a kept session grants nothing by itself: each unwrap runs
PolicyPCR and PolicyNV again, so a PCR extended or a tamper latch counted between two unwraps is refused."""

from __future__ import annotations

import pytest

from attest.swtpm_fixture import *  # noqa: F403  (the swtpm fixtures; tests/ is on the path)

from codemoat.attest import AttestError
from codemoat.attest.tpm import TAMPER_NV_INDEX, TAMPER_PCR, TpmAttestor
from codemoat.vault.tpmwrap import unwrap_p256, wrap_p256


def _ident(tcti: str) -> dict:
    with TpmAttestor(tcti) as a:
        return a.identity([TAMPER_PCR])


def _sessions(a: TpmAttestor) -> list[int]:
    """Count the policy sessions `a` starts (TPM2_StartAuthSession, sent by attest.tpmcmd; the real call still runs)."""
    real, n = a._cmd.start_policy_session, [0]

    def counting(*args, **kw):
        n[0] += 1
        return real(*args, **kw)

    a._cmd.start_policy_session = counting
    return n


def test_two_unwraps_on_one_connection_start_one_policy_session(swtpm):
    ident = _ident(swtpm.tcti)
    keys = [wrap_p256(ident["unwrap"], bytes([i]) * 32, b"ctx") for i in range(3)]
    with TpmAttestor(swtpm.tcti) as a:
        n = _sessions(a)
        got = [unwrap_p256(lambda p: a.zgen(ident["policy"], p), ident["unwrap"], w, b"ctx", "key") for w in keys]
        assert got == [bytes([i]) * 32 for i in range(3)]
        assert n[0] == 1


@pytest.mark.parametrize("event", ["pcr", "latch"])
def test_a_kept_session_does_not_unwrap_after_a_tamper_event(swtpm, event):
    ident = _ident(swtpm.tcti)
    wrapped = wrap_p256(ident["unwrap"], b"k" * 32, b"ctx")
    with TpmAttestor(swtpm.tcti) as a:
        assert unwrap_p256(lambda p: a.zgen(ident["policy"], p), ident["unwrap"], wrapped, b"ctx", "key") == b"k" * 32
        if event == "pcr":
            a.extend(TAMPER_PCR, b"chassis opened")
        else:  # the latch alone (as after a reboot reset the PCR): PolicyNV must fail on the kept session too
            h = a._counter(TAMPER_NV_INDEX, create=False, what="tamper latch")
            a.ctx.nv_increment(h, auth_handle=h)
        with pytest.raises(AttestError, match="refused to unwrap"):
            unwrap_p256(lambda p: a.zgen(ident["policy"], p), ident["unwrap"], wrapped, b"ctx", "key")
        # the failed use's session was flushed, not kept: the next unwrap starts a fresh one, and is refused too
        n = _sessions(a)
        with pytest.raises(AttestError, match="refused to unwrap"):
            unwrap_p256(lambda p: a.zgen(ident["policy"], p), ident["unwrap"], wrapped, b"ctx", "key")
        assert n[0] == 1


def test_a_policy_run_ahead_is_refused_once_a_pcr_moved_and_run_again(swtpm):
    """prepare_unwrap runs PolicyPCR and PolicyNV while a start still checks the license, so the unwrap is one
    command. A PCR extended in between (the OS measuring, here PCR 14, outside the policy) makes the chip refuse the
    session (TPM_RC_PCR_CHANGED): zgen runs the policy again on a fresh session and unwraps. The policy's own PCR
    extended in between (a tamper event): refused, as without running ahead."""
    ident = _ident(swtpm.tcti)
    wrapped = wrap_p256(ident["unwrap"], b"k" * 32, b"ctx")
    with TpmAttestor(swtpm.tcti) as a:
        a.prepare_unwrap(ident["policy"])
        a.extend(14, b"the OS measured a file")
        n = _sessions(a)
        assert unwrap_p256(lambda p: a.zgen(ident["policy"], p), ident["unwrap"], wrapped, b"ctx", "key") == b"k" * 32
        assert n[0] == 1  # the prepared session was refused, a fresh one unwrapped
        a.prepare_unwrap(ident["policy"])  # on the kept session
        assert unwrap_p256(lambda p: a.zgen(ident["policy"], p), ident["unwrap"], wrapped, b"ctx", "key") == b"k" * 32
        assert n[0] == 1
        a.prepare_unwrap(ident["policy"])
        a.extend(TAMPER_PCR, b"chassis opened")
        with pytest.raises(AttestError, match="PCRs no longer match"):
            unwrap_p256(lambda p: a.zgen(ident["policy"], p), ident["unwrap"], wrapped, b"ctx", "key")
