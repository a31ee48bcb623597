"""Audit checkpoints signed by a real swtpm: the chip's monotonic counter catches a rolled-back log."""

from __future__ import annotations

import base64
import json
import shutil

import pytest
from conftest import run_cli

from codemoat.attest.tpm import TpmAttestor
from codemoat.attest.tpmcounters import AUDIT_NV_INDEX
from codemoat.audit.tpm_checkpoint import checkpoint_data, take
from codemoat.audit.verify import verify as chain_verify
from codemoat.vault.tpmwrap import QuoteRefused, counter_name, verify_nv_certify

from .tpmhelp import append, audit_log, tpm_machine


def test_a_log_rolled_back_to_an_earlier_copy_fails_against_the_tpm_counter(swtpm, tmp_path, monkeypatch):
    machine = tpm_machine(swtpm)
    db = tmp_path / "audit.db"
    url = f"sqlite:///{db}"
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    log = audit_log(url)
    append(log, 5)
    first = take(log, machine)
    assert first["counter"] == 1 and first["seq"] == 5
    append(log, 3)
    assert log.verify().ok

    copy = tmp_path / "copy"  # an earlier copy of everything the writer keeps: database and head file
    copy.mkdir()
    log.engine.dispose()  # (SQLite in WAL mode: the database is whole once its connections close)
    for f in (db, log.head_file):
        shutil.copy(f, copy / f.name)

    append(log, 4)
    assert take(log, machine)["counter"] == 2
    append(log, 1)
    rep = log.verify()
    assert rep.ok, rep.problem

    log.engine.dispose()
    for f in (db, log.head_file):  # rolled back: every signature in it is valid
        shutil.copy(copy / f.name, f)
    log.verified_file.unlink()  # and the verifier's memory of the newer head wiped too
    log = audit_log(url)
    soft = chain_verify(log.engine, log.public_key(), head_file=log.head_file)
    assert soft.ok  # the software key's signatures cannot tell
    rep = log.verify()
    assert not rep.ok and rep.first_bad == 7
    assert "rolled back: the TPM's audit counter is at 2" in rep.problem and "(record 6) holds 1" in rep.problem

    # the service account asks the chip for a fresh checkpoint over the rolled-back log: the counter skips
    take(log, machine)
    rep = log.verify()
    assert not rep.ok and "counter jumps from 1 (record 6) to 3" in rep.problem

    # the CLI says so in one line and exits 1
    p = run_cli("audit", "verify")
    assert p.returncode == 1 and "counter jumps from 1" in p.stdout, p.stdout + p.stderr


def test_a_fresh_log_with_tpm_checkpoints_verifies_and_the_cli_takes_them(swtpm, tmp_path, monkeypatch):
    tpm_machine(swtpm)
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    log = audit_log(url)
    append(log, 2)
    for n in (1, 2):
        p = run_cli("audit", "tpm-checkpoint", "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["counter"] == n
    p = run_cli("audit", "verify")
    assert p.returncode == 0 and "audit log OK" in p.stdout, p.stdout + p.stderr
    p = run_cli("audit", "export", "--kind", "tpm_checkpoint")
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 2, p.stdout + p.stderr


def test_nv_certify_of_the_counter_verifies_and_each_forgery_is_refused(swtpm_factory):
    one, two = swtpm_factory(ek_cert=False), swtpm_factory(ek_cert=False)
    data = checkpoint_data("ak", 7, "ab" * 32)
    with TpmAttestor(one.tcti) as a:
        ak = a.identity([15])["ak"]
        q, n = a.audit_checkpoint(data)
    info = verify_nv_certify(ak, q.attest, q.r, q.s, data, AUDIT_NV_INDEX)
    assert info.counter == n == 1 and counter_name(AUDIT_NV_INDEX) in q.attest
    with pytest.raises(QuoteRefused, match="another record"):  # over another head
        verify_nv_certify(ak, q.attest, q.r, q.s, checkpoint_data("ak", 8, "ab" * 32), AUDIT_NV_INDEX)
    raw = bytearray(q.attest)
    raw[-1] ^= 1  # the counter value, edited
    with pytest.raises(QuoteRefused, match="does not verify"):
        verify_nv_certify(ak, bytes(raw), q.r, q.s, data, AUDIT_NV_INDEX)
    with TpmAttestor(two.tcti) as b:  # another chip's certification, claimed for this AK
        q2, _ = b.audit_checkpoint(data)
    with pytest.raises(QuoteRefused, match="does not verify"):
        verify_nv_certify(ak, q2.attest, q2.r, q2.s, data, AUDIT_NV_INDEX)
    with pytest.raises(QuoteRefused, match="another NV index"):  # a look-alike index elsewhere
        verify_nv_certify(ak, q.attest, q.r, q.s, data, AUDIT_NV_INDEX + 1)
    assert base64.b64encode(q.r)  # (r, s) are the chip's ECDSA signature, 32 bytes at most each
