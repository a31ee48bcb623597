"""TPM audit checkpoints over a log whose signatures are batched (`audit.sign_every` > 1, as on
PostgreSQL): the chip certifies the chain's tip, not a signed head that trails it, and its own
record is signed at once, so `audit verify` (the TPM's counter included) holds with no tail."""

from __future__ import annotations

from codemoat.audit.tpm_checkpoint import take

from .tpmhelp import append, audit_log, tpm_machine


def test_a_tpm_checkpoint_covers_the_unsigned_tail(swtpm, tmp_path, monkeypatch):
    machine = tpm_machine(swtpm)
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    log = audit_log(url, sign_every=50, sign_interval_ms=600_000)
    append(log, 7)
    assert log.verify().unsigned == 7  # nothing signed yet
    got = take(log, machine)
    assert got is not None and got["seq"] == 7 and got["counter"] == 1  # the tip, not a trailing head
    rep = log.verify()
    assert rep.ok and rep.unsigned == 0 and rep.records == 8, rep.problem
