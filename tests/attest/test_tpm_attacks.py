"""Attacks on the TPM work of issue 18 (EK->AK binding, the audit counter), each against real swtpm chips.

A customer's admin holds the owner hierarchy (its auth is empty on most machines) and the audit
database; a vendor-side insider can run `vendor tpm challenge` on any identity a customer sends.
"""

from __future__ import annotations

import shutil

import pytest

from codemoat import paths
from codemoat.attest import AttestError
from codemoat.attest.tpm import AUDIT_NV_INDEX, TAMPER_PCR, TpmAttestor
from codemoat.audit.log import AuditLog, head_file_for, verified_file_for
from codemoat.audit.tpm_checkpoint import take
from codemoat.db import open_db
from codemoat.vault.codec import VaultError
from codemoat.vault.machine import parse_identity
from codemoat.vault.tpmbind import activate, challenge, require_bound
from codemoat.vault.vendor import Vendor

from .tpmhelp import bind, tpm_machine


@pytest.fixture
def vendor(tmp_path):
    v = Vendor.init(tmp_path / "vendor")
    yield v
    v.close()


def test_a_new_challenge_pairing_a_bound_ak_with_another_ek_does_not_inherit_the_binding(vendor, swtpm_factory):
    one, two = swtpm_factory(), swtpm_factory()
    key = tpm_machine(one, vendor)  # chip one's AK, bound to chip one's EK
    ident = parse_identity(key.identity())
    require_bound(vendor.engine, ident)
    with TpmAttestor(two.tcti) as a:
        other = a.identity([TAMPER_PCR])
    # the bound AK presented beside another genuine chip's EK and certificate: the challenge is made
    # (each part checks out on its own), but nothing has proven the pair, so no license may name it
    forged = dict(ident, tpm=dict(ident["tpm"], ek=other["ek"], ek_cert=other["ek_cert"]))
    ch = challenge(vendor, forged)
    with pytest.raises(VaultError, match="not bound to its EK"):
        require_bound(vendor.engine, forged)
    with pytest.raises(AttestError, match="refused the vendor's credential"):  # neither chip can answer it
        activate(TpmAttestor(one.tcti), key.id, forged["tpm"], ch)
    # the genuine pair binds again through the chip, and only the genuine pair
    bind(vendor, key, one.ca)
    require_bound(vendor.engine, ident)
    with pytest.raises(VaultError, match="not bound to its EK"):
        require_bound(vendor.engine, forged)


def _log(url: str) -> AuditLog:
    home = paths.home()
    return AuditLog(
        open_db(url), checkpoint_every=4, head_file=head_file_for(url, home), verified_file=verified_file_for(url, home)
    )


def _append(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.append("request", user="alice", route="/v1/completions", status=200, prompt_tokens=i)


def _replace_counter_with_ordinary_index(tcti: str, value: int) -> None:
    """What an owner can do: undefine the audit counter and define an ordinary 8-byte index at the same
    handle, holding whatever value it likes (an ordinary index can be written back down)."""
    import tpm2_pytss as pt

    with TpmAttestor(tcti) as a:
        c = a.ctx
        c.nv_undefine_space(c.tr_from_tpmpublic(AUDIT_NV_INDEX), pt.ESYS_TR.OWNER)
        attrs = pt.TPMA_NV.AUTHWRITE | pt.TPMA_NV.AUTHREAD | pt.TPMA_NV.NO_DA
        pub = pt.TPM2B_NV_PUBLIC(
            nvPublic=pt.TPMS_NV_PUBLIC(nvIndex=AUDIT_NV_INDEX, nameAlg=pt.TPM2_ALG.SHA256, attributes=attrs, dataSize=8)
        )
        h = c.nv_define_space(b"", pub, pt.ESYS_TR.OWNER)
        c.nv_write(h, value.to_bytes(8, "big"), 0, auth_handle=h)


def test_a_rolled_back_log_is_not_hidden_by_an_ordinary_nv_index_holding_the_old_counter(swtpm, tmp_path, monkeypatch):
    machine = tpm_machine(swtpm)
    db = tmp_path / "audit.db"
    url = f"sqlite:///{db}"
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    log = _log(url)
    _append(log, 5)
    assert take(log, machine)["counter"] == 1
    _append(log, 2)
    copy = tmp_path / "copy"
    copy.mkdir()
    log.engine.dispose()
    for f in (db, log.head_file):
        shutil.copy(f, copy / f.name)
    _append(log, 3)
    assert take(log, machine)["counter"] == 2
    log.engine.dispose()
    for f in (db, log.head_file):  # the log put back to the copy with one TPM checkpoint (counter 1)
        shutil.copy(copy / f.name, f)
    log.verified_file.unlink(missing_ok=True)
    log = _log(url)
    rep = log.verify()
    assert not rep.ok and "rolled back" in rep.problem  # the chip's counter (2) says so...

    _replace_counter_with_ordinary_index(swtpm.tcti, 1)  # ...so the admin makes the chip "say" 1
    rep = log.verify()
    assert not rep.ok and "not codemoat's audit counter" in rep.problem, rep.problem
    with pytest.raises(AttestError, match="not codemoat's audit counter"):  # and no checkpoint is taken over it
        take(log, machine)


def test_a_log_truncated_before_its_only_tpm_checkpoint_fails_unless_the_operator_rotated_it(swtpm, tmp_path, monkeypatch):
    machine = tpm_machine(swtpm)
    db = tmp_path / "audit.db"
    url = f"sqlite:///{db}"
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    log = _log(url)
    _append(log, 5)
    assert log.verify().ok
    copy = tmp_path / "copy"  # taken before the log's first (and only) TPM checkpoint
    copy.mkdir()
    log.engine.dispose()
    for f in (db, log.head_file):
        shutil.copy(f, copy / f.name)
    assert take(log, machine)["counter"] == 1
    _append(log, 3)
    assert log.verify().ok
    log.engine.dispose()
    for f in (db, log.head_file):  # the checkpoint and everything after it gone, every signature valid
        shutil.copy(copy / f.name, f)
    log.verified_file.unlink(missing_ok=True)
    log = _log(url)
    rep = log.verify()
    assert not rep.ok and "holds none of them" in rep.problem, rep
    # an operator who starts a new chain on purpose says so in the log (a signed rotation record first)
    log.rotate(tmp_path / "archive.jsonl")
    rep = log.verify()
    assert rep.ok and "rotated" in (rep.warning or ""), rep
    assert take(log, machine)["counter"] == 2  # and the next checkpoint starts the new log's sequence
    assert log.verify().ok
