"""CRLs for offline licenses (vault.crl): the vendor revokes a license or a machine without reaching it;
the machine installs the signed list and a revoked license refuses to start, naming the reason.
Attacker's cases: an older CRL over a newer one, another vendor's, an edited one (in transit or once
installed), one with the same number and other contents."""

from __future__ import annotations

import json
import os
import time

import pytest

from codemoat.vault import crl, vendor_crl
from codemoat.vault.codec import VaultError
from codemoat.vault.vendor import Vendor
from codemoat.vault.verify import verify_bundle
from attest.swtpm_fixture import *  # noqa: F403  (the swtpm fixtures)
from vaulthelp import bundle, cli, one_line_error


@pytest.fixture
def offline(vendor, machine, model, tmp_path):
    """A sealed model and offline license this machine has opened once (so it trusts the vendor)."""
    moat, lic, doc = bundle(vendor, model, tmp_path / "out", machine)
    assert verify_bundle(moat, lic)["ok"]
    return moat, lic, doc["license"]["id"]


def _crl(vendor, tmp_path, name: str, **revoke) -> bytes:
    if revoke:
        vendor_crl.revoke(vendor, **revoke)
    p = tmp_path / name
    p.write_text(json.dumps(vendor_crl.build(vendor)))
    return p.read_bytes()


def test_a_revoked_license_refuses_to_start_with_the_reason(vendor, offline, tmp_path):
    moat, lic, lid = offline
    data = _crl(vendor, tmp_path, "1.crl", licenses=[lid], reason="customer contract ended")
    got, new = crl.install(data)
    assert new and got.number == 1
    with pytest.raises(VaultError, match=f"license {lid} was revoked by the vendor on .*: customer contract ended \\(CRL 1\\)"):
        verify_bundle(moat, lic)
    assert vendor.license_row(lid).revoked_at  # its leases end too, at the key server


def test_a_revoked_machine_refuses_every_license_on_it(vendor, machine, offline, tmp_path):
    moat, lic, _ = offline
    crl.install(_crl(vendor, tmp_path, "m.crl", machines=[machine.id], reason="appliance reported stolen"))
    with pytest.raises(VaultError, match=f"machine {machine.id} was revoked .*appliance reported stolen"):
        verify_bundle(moat, lic)


def test_a_crl_naming_others_leaves_this_license_serving(vendor, offline, tmp_path):
    moat, lic, _ = offline
    crl.install(_crl(vendor, tmp_path, "o.crl", machines=["m_someone_else"], reason="lost"))
    assert verify_bundle(moat, lic)["ok"]


def test_an_older_crl_cannot_replace_a_newer_one(vendor, offline, tmp_path):
    """Anti-rollback: installing an old list (from before the revocation) would un-revoke the license."""
    moat, lic, lid = offline
    old = _crl(vendor, tmp_path, "old.crl", machines=["m_other"], reason="lost")
    new = _crl(vendor, tmp_path, "new.crl", licenses=[lid], reason="unpaid")
    assert crl.install(new)[1]
    with pytest.raises(VaultError, match="CRL number 1 is older than the installed one \\(2\\): a CRL cannot be rolled back"):
        crl.install(old)
    with pytest.raises(VaultError, match="unpaid"):
        verify_bundle(moat, lic)
    assert crl.install(new) == (crl.Crl.parse(new), False)  # the same list again: nothing to do


def test_a_crl_signed_by_another_vendor_key_is_refused(offline, tmp_path):
    other = Vendor.init(tmp_path / "other-vendor")
    try:
        with pytest.raises(VaultError, match="which this machine does not trust"):
            crl.install(_crl(other, tmp_path, "x.crl", machines=["m_x"], reason="x"))
    finally:
        other.close()


def test_an_edited_crl_is_refused(vendor, offline, tmp_path):
    """A revocation taken out (or a reason or number changed) after signing fails the vendor's signature."""
    moat, lic, lid = offline
    doc = json.loads(_crl(vendor, tmp_path, "t.crl", licenses=[lid], reason="unpaid"))
    for edit in (
        lambda b: b.update(revoked=[]),
        lambda b: b.update(number=99),
        lambda b: b["revoked"][0].update(id="lic_other"),
    ):
        bad = json.loads(json.dumps(doc))
        edit(bad["crl"])
        with pytest.raises(VaultError, match="CRL: bad signature"):
            crl.install(json.dumps(bad).encode())
    forged = dict(doc, crl=dict(doc["crl"], number=doc["crl"]["number"] + 1, revoked=[]))
    with pytest.raises(VaultError, match="bad signature"):  # a higher number cannot be made up either
        crl.install(json.dumps(forged).encode())
    assert verify_bundle(moat, lic)["ok"]  # nothing was installed


def test_an_installed_crl_edited_on_disk_refuses_to_start(vendor, offline, tmp_path):
    """Fail closed: taking the license out of the installed file breaks its signature, and start is refused."""
    moat, lic, lid = offline
    got, _ = crl.install(_crl(vendor, tmp_path, "d.crl", licenses=[lid], reason="unpaid"))
    p = crl.installed_path(got.body["vendor_key"])
    doc = json.loads(p.read_text())
    doc["crl"]["revoked"] = []
    p.write_text(json.dumps(doc))
    with pytest.raises(VaultError, match="the installed CRL .* does not verify"):
        verify_bundle(moat, lic)


@pytest.mark.parametrize("damage", ["edited", "garbage", "another vendor's"])
def test_a_damaged_installed_crl_is_mended_by_installing_the_latest_and_not_by_an_older_one(vendor, offline, tmp_path, damage):
    """Start refuses a damaged installed CRL and says to install the vendor's latest again; install then refused
    too ("does not verify"), so the machine stayed down until someone deleted the file by hand. Install now
    replaces it, and the CRL number this machine recorded still refuses an older list."""
    moat, lic, lid = offline
    older = _crl(vendor, tmp_path, "1.crl", machines=["m_other"], reason="lost")
    crl.install(older)
    latest = _crl(vendor, tmp_path, "2.crl", licenses=[lid], reason="unpaid")
    got, _ = crl.install(latest)
    p = crl.installed_path(got.body["vendor_key"])
    if damage == "edited":
        doc = json.loads(p.read_text())
        doc["crl"]["revoked"] = []
        p.write_text(json.dumps(doc))
    elif damage == "garbage":
        p.write_bytes(b"\x00" * 100)
    else:
        doc = json.loads(p.read_text())
        doc["crl"]["vendor_key"] = "A" * 43 + "="
        p.write_text(json.dumps(doc))
    with pytest.raises(VaultError, match="install the vendor's latest CRL again"):
        verify_bundle(moat, lic)
    with pytest.raises(VaultError, match="CRL number 1 is older than the installed one \\(2\\)"):
        crl.install(older)  # the damage does not open the way back
    again, new = crl.install(latest)
    assert new and again.number == 2 and p.read_bytes() == latest
    with pytest.raises(VaultError, match=f"license {lid} was revoked by the vendor"):
        verify_bundle(moat, lic)


def test_a_different_crl_with_the_same_number_is_refused(vendor, offline, tmp_path):
    """Two signed lists with one number exist only if the vendor database was rolled back; neither replaces the other."""
    crl.install(_crl(vendor, tmp_path, "a.crl", machines=["m_a"], reason="a"))
    body = vendor_crl.build(vendor)["crl"]
    body["revoked"] = [dict(body["revoked"][0], id="m_b")]
    from codemoat.vault.codec import b64e, canonical, sign

    same = {"kind": crl.KIND, "version": 1, "crl": body, "signature": b64e(sign(vendor.signing_key, crl.DOMAIN, canonical(body)))}
    with pytest.raises(VaultError, match="a different CRL with the same number \\(1\\)"):
        crl.install(json.dumps(same).encode())


def test_cli_revoke_install_and_refusal_are_one_line_each(vendor, offline, tmp_path):
    moat, lic, lid = offline
    out = tmp_path / "rev.crl"
    vendor.close()  # the CLI opens the vendor directory itself
    p = cli(
        "vendor",
        "revoke",
        "--vendor",
        str(vendor.root),
        "--license",
        lid,
        "--reason",
        "licence terminated",
        "--out",
        str(out),
        "--json",
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"number": 1, "revoked": 1, "file": str(out)}
    p = cli("license", "crl", "install", str(out))
    assert p.returncode == 0 and "CRL 1 (1 revoked) installed" in p.stdout, p.stderr
    line = one_line_error(cli("verify", "--model", str(moat), "--license", str(lic)))
    assert f"license {lid} was revoked by the vendor" in line and "licence terminated" in line
    shown = json.loads(cli("license", "crl", "show", "--json").stdout)
    assert [(r["kind"], r["id"], r["reason"]) for r in shown] == [("license", lid, "licence terminated")]
    p = cli("vendor", "revoke", "--vendor", str(vendor.root), "--license", "lic_nope", "--out", str(tmp_path / "x.crl"))
    assert "no license lic_nope" in one_line_error(p)
    bad = tmp_path / "bad.crl"
    bad.write_text("{not json")
    assert "CRL is not valid JSON" in one_line_error(cli("license", "crl", "install", str(bad)))
    assert "CRL not found" in one_line_error(cli("license", "crl", "install", str(tmp_path / "missing.crl")))


def test_a_revoked_offline_license_does_not_serve(vendor, offline, tmp_path):
    """`codemoat serve` on a revoked license stops at start with the reason (one line), before any model loads."""
    moat, lic, lid = offline
    data = _crl(vendor, tmp_path, "s.crl", licenses=[lid], reason="licence terminated")
    crl.install(data)
    p = cli("serve", "--model", str(moat), "--license", str(lic), "--port", "1")
    line = one_line_error(p)
    assert f"license {lid} was revoked" in line and "licence terminated" in line


def test_revocations_are_numbered_in_order_and_listed_once(vendor, offline, tmp_path):
    _, _, lid = offline
    assert vendor_crl.build(vendor)["crl"]["number"] == 0
    assert vendor_crl.revoke(vendor, licenses=[lid], reason="a", now=int(time.time())) == 1
    assert vendor_crl.revoke(vendor, licenses=[lid], reason="again") == 1  # already listed: nothing new
    assert vendor_crl.revoke(vendor, machines=["m_1", "m_2"], reason="b") == 3
    assert [e["id"] for e in vendor_crl.build(vendor)["crl"]["revoked"]] == [lid, "m_1", "m_2"]
    for bad in ("", "two\nlines", "x" * 501):
        with pytest.raises(VaultError, match="one line"):
            vendor_crl.revoke(vendor, machines=["m_3"], reason=bad)


def test_a_revoked_machine_gets_no_lease_from_the_key_server(vendor, machine, model, tmp_path):
    """`vendor revoke --machine` reaches lease licenses too: the key server refuses that machine (terminal
    `revoked`, the client unloads at once) within the time it keeps a license document."""
    from codemoat.vault.keyserver import REQUEST_DOMAIN, TERMINAL, KeyServer, LeaseDenied
    from codemoat.vault.lease import LeaseClient
    from codemoat.vault.license import License

    _, lic, _ = bundle(vendor, model, tmp_path / "lease", machine, mode="lease", keyserver="http://127.0.0.1:9")
    client = LeaseClient(License.load(lic), machine)
    ks = KeyServer(vendor)
    assert "lease" in ks.lease(client._signed_request(ks.challenge(client.lic.id)["nonce"], REQUEST_DOMAIN))
    vendor_crl.revoke(vendor, machines=[machine.id], reason="appliance reported stolen")
    ks._docs.clear()  # what DOC_TTL (2 s) does on its own
    with pytest.raises(LeaseDenied, match="appliance reported stolen") as e:
        ks.lease(client._signed_request(ks.challenge(client.lic.id)["nonce"], REQUEST_DOMAIN))
    assert e.value.code == "revoked" and e.value.code in TERMINAL
    client.close()


def test_a_crl_installed_while_serving_unloads_the_model(vendor, machine, gguf_file, tmp_path):
    """A server already running stops serving a license revoked under it at its next watch step (each
    second): the model is unloaded and every request answers 503 with the vendor's reason."""
    from codemoat.config import load_settings
    from codemoat.engines.sealed import open_sealed
    from codemoat.errors import Unavailable

    moat, lic, doc = bundle(vendor, gguf_file, tmp_path / "serve", machine)
    holder = open_sealed(
        moat, lic, settings=load_settings(**{"model.n_ctx": 256, "model.n_threads": 1, "model.isolation": "inline"})
    )
    try:
        assert holder.loaded
        holder.watch.step()  # no CRL, or one naming others: serving goes on
        crl.install(_crl(vendor, tmp_path, "o.crl", machines=["m_other"], reason="lost"))
        holder.watch.step()
        assert holder.loaded
        crl.install(_crl(vendor, tmp_path, "r.crl", licenses=[doc["license"]["id"]], reason="licence terminated"))
        holder.watch.step()  # what the watch thread does within a second
        assert not holder.loaded
        with pytest.raises(Unavailable, match="was revoked by the vendor on .*licence terminated"):
            holder.get()
    finally:
        holder.close()


# -- the installed CRL number sticks (issue 18): the clock record keeps it ------------------------------------
def _revoked_installed(vendor, offline, tmp_path):
    """An older CRL (naming someone else) saved aside, then the CRL revoking this license installed."""
    moat, lic, lid = offline
    old = _crl(vendor, tmp_path, "old.crl", machines=["m_other"], reason="lost")
    crl.install(old)
    got, _ = crl.install(_crl(vendor, tmp_path, "new.crl", licenses=[lid], reason="unpaid"))
    return moat, lic, old, crl.installed_path(got.body["vendor_key"])


def test_deleting_the_crl_folder_does_not_bring_a_revoked_license_back(vendor, offline, tmp_path):
    """Before: with $CODEMOAT_HOME/crl/ gone the revoked license verified and served again."""
    import shutil

    moat, lic, _, p = _revoked_installed(vendor, offline, tmp_path)
    shutil.rmtree(p.parent)
    with pytest.raises(VaultError, match="is missing, but this machine installed CRL 2: install the vendor's latest CRL"):
        verify_bundle(moat, lic)
    line = one_line_error(cli("verify", "--model", str(moat), "--license", str(lic)))
    assert "is missing, but this machine installed CRL 2" in line


def test_an_older_crl_put_back_in_place_is_refused_at_start(vendor, offline, tmp_path):
    """The file copied over (not installed): before, the older list's silence about this license let it start."""
    moat, lic, old, p = _revoked_installed(vendor, offline, tmp_path)
    p.write_bytes(old)
    with pytest.raises(VaultError, match="is number 1, older than CRL 2 this machine installed"):
        verify_bundle(moat, lic)
    with pytest.raises(VaultError, match="CRL number 1 is older than the installed one \\(2\\)"):
        crl.install(old)  # and with the file deleted, install still refuses the older one
    p.unlink()
    with pytest.raises(VaultError, match="CRL number 1 is older than the installed one \\(2\\)"):
        crl.install(old)


def test_a_home_restored_from_a_backup_but_its_clock_record_still_refuses(vendor, offline, tmp_path):
    """Everything in the home put back as it was before the revocation, except the clock record."""
    import shutil

    from codemoat import paths

    moat, lic, lid = offline
    crl.install(_crl(vendor, tmp_path, "old.crl", machines=["m_other"], reason="lost"))
    home = paths.home()
    backup = tmp_path / "backup"
    shutil.copytree(home, backup)
    crl.install(_crl(vendor, tmp_path, "new.crl", licenses=[lid], reason="unpaid"))
    for f in backup.rglob("*"):
        if f.is_file() and f.name != "clock.json":
            shutil.copy2(f, home / f.relative_to(backup))
    with pytest.raises(VaultError, match="older than CRL 2 this machine installed"):
        verify_bundle(moat, lic)


def test_the_crl_number_cannot_be_taken_out_of_the_clock_record(vendor, offline, machine, tmp_path):
    """The number is under the record's tag: dropping or lowering it is an altered record, not a reset."""
    from codemoat.vault.clock import ClockGuard

    moat, lic, _, p = _revoked_installed(vendor, offline, tmp_path)
    guard = ClockGuard(machine)
    record = json.loads(guard.path.read_text())
    assert list(record["crl"].values()) == [2]
    for edit in (lambda d: d.pop("crl"), lambda d: d.update(crl={k: 1 for k in d["crl"]})):
        bad = json.loads(json.dumps(record))
        edit(bad)
        guard.path.write_text(json.dumps(bad))
        with pytest.raises(VaultError, match="was altered"):
            verify_bundle(moat, lic)
    guard.path.write_text(json.dumps(record))
    with pytest.raises(VaultError, match="unpaid"):
        verify_bundle(moat, lic)


def test_a_crl_deleted_or_rolled_back_under_a_running_server_stops_it(vendor, offline, machine, tmp_path):
    """The running server's watch: it has seen CRL 2, so the file gone or CRL 1 in its place is a refusal."""
    from codemoat.vault.license import License

    moat, lic, lid = offline
    old = _crl(vendor, tmp_path, "old.crl", machines=["m_other"], reason="lost")
    crl.install(old)
    w = crl.InstalledWatch(License.load(lic).body, machine.id)
    assert w.revoked() is None
    crl.install(_crl(vendor, tmp_path, "new.crl", machines=["m_other2"], reason="lost"))
    assert w.revoked() is None
    p = crl.installed_path(License.load(lic).body["vendor_key"])
    p.unlink()
    assert "is missing, but CRL 2 was installed" in w.revoked()
    p.write_bytes(old)
    assert "is number 1, but CRL 2 was installed" in w.revoked()


def test_two_revocations_at_once_on_postgresql_never_make_a_crl_that_skips_one(pg_cluster, tmp_path):
    """PostgreSQL hands out sequence numbers at insert, not at commit: another admin's revocation still
    uncommitted (seq 1) while one is committed (seq 2) made a CRL numbered 2 without the first; the next
    CRL, with both, had the same number 2, and a machine holding the first refused it as 'a different CRL
    with the same number'. Revocations now commit in the order of their numbers."""
    import threading

    from codemoat.vault.vendor_tables import revocations_t

    url = pg_cluster.new_database()
    Vendor.init(tmp_path / "v", database_url=url).close()
    v1, v2 = Vendor.open(tmp_path / "v"), Vendor.open(tmp_path / "v")
    try:
        with v1.engine.connect() as c1:
            tx = c1.begin()  # another admin's `vendor revoke`, not committed yet
            c1.execute(revocations_t.insert().values(kind="machine", subject="m_a", reason="a", revoked_at=1))
            t = threading.Thread(target=vendor_crl.revoke, args=(v2,), kwargs={"machines": ["m_b"], "reason": "b"})
            t.start()
            t.join(2)  # committed at once before; now it waits for the first
            seqs = [e["id"] for e in vendor_crl.build(v2)["crl"]["revoked"]]
            assert seqs in ([], ["m_a"], ["m_a", "m_b"]), seqs
            tx.commit()
        t.join()
        body = vendor_crl.build(v2)["crl"]
        assert body["number"] == 2 and [e["id"] for e in body["revoked"]] == ["m_a", "m_b"]
    finally:
        v1.close()
        v2.close()


def test_on_a_tpm_machine_a_clock_record_put_back_from_before_an_install_is_refused(vendor, model, tmp_path, swtpm):
    """Without a TPM, a clock record restored from before the install (with the crl folder) is not caught
    (docs/threat-model.md). With the machine's keys in a TPM every install counts in an NV counter, and a
    record behind it refuses start and install: even installing an older CRL over it is refused."""
    import shutil

    from attest.tpmhelp import tpm_machine

    from codemoat import paths
    from codemoat.vault.clock import ClockGuard

    machine = tpm_machine(swtpm, vendor)
    moat, lic, doc = bundle(vendor, model, tmp_path / "out", machine)
    lid = doc["license"]["id"]
    assert verify_bundle(moat, lic)["ok"]
    old = _crl(vendor, tmp_path, "old.crl", machines=["m_other"], reason="lost")
    crl.install(old)
    home = paths.home()
    backup = tmp_path / "backup"
    shutil.copytree(home, backup)  # the whole home, clock record included, from before the revocation
    crl.install(_crl(vendor, tmp_path, "new.crl", licenses=[lid], reason="unpaid"))
    with pytest.raises(VaultError, match="unpaid"):
        verify_bundle(moat, lic)
    guard = ClockGuard(machine)
    shutil.copy2(backup / "clock.json", guard.path)
    shutil.copy2(
        backup / "crl" / crl.installed_path(doc["license"]["vendor_key"]).name, crl.installed_path(doc["license"]["vendor_key"])
    )
    with pytest.raises(VaultError, match="older than this machine's TPM: the TPM counted .* CRL installs"):
        verify_bundle(moat, lic)
    with pytest.raises(VaultError, match="older than this machine's TPM"):
        crl.install(old)
    shutil.rmtree(home / "crl")  # from before the first install: no CRL, no count in the record
    record = json.loads(guard.path.read_text())
    hwm = record["hwm"]
    guard.path.write_text(json.dumps({"hwm": hwm, "mac": guard._mac(hwm)}))  # validly tagged, no CRL in it
    assert guard.crl_number("tpm") is None
    with pytest.raises(VaultError, match="older than this machine's TPM"):
        verify_bundle(moat, lic)


def test_a_clock_record_write_at_the_same_time_never_loses_a_crl_number(vendor, offline, machine, monkeypatch):
    """Two processes write the clock record: a serve raising its mark (each start, each lease) and
    `license crl install`. Before, the serve's write (from the record it had read) could drop the number
    just recorded: harmless for a CRL file still there, but a TPM count lost so leaves the record behind
    the chip and the machine refusing to start. Writes now merge under a lock across processes."""
    import threading

    from codemoat.vault import clock
    from codemoat.vault.clock import ClockGuard, ManualClock

    serve = ClockGuard(machine, ManualClock(time.time() + 60))
    install = ClockGuard(machine)
    real_write, threads = clock.write_secret, []

    def install_writes_first(path, data):  # the install's write lands between the serve's read and its write
        if not threads:
            threads.append(threading.Thread(target=install.record_crl, args=({"tpm": 7},)))
            threads[0].start()
            threads[0].join(1)  # finished at once before; now it waits for the serve's write
        real_write(path, data)

    monkeypatch.setattr(clock, "write_secret", install_writes_first)
    serve.check()
    threads[0].join()
    assert install.crl_number("tpm") == 7
    assert install.read() >= int(time.time() + 59)  # and the serve's mark is kept too


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_named_as_the_crl_is_refused_not_read_for_good(offline, tmp_path, kind):
    """`license crl install` read the whole file: a FIFO (a hostile USB stick) hung it for good, /dev/zero
    filled memory. Only a regular file is read, and at most 64 MiB of it."""
    import subprocess
    import sys

    if kind == "fifo":
        path = tmp_path / "revoked.crl"
        os.mkfifo(path)
    else:
        path = "/dev/zero"
    p = subprocess.run(
        [sys.executable, "-m", "codemoat.cli.main", "license", "crl", "install", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "not a regular file" in one_line_error(p)


def test_on_a_tpm_machine_a_deleted_crl_counter_does_not_let_an_old_clock_record_back(vendor, model, tmp_path, swtpm):
    """The owner (empty owner authorization, the default) deletes the TPM's CRL counter and puts back the
    clock record and CRL from before the revocation. Before, a counter the chip no longer holds read as
    "never counted" and the check was skipped: the revoked license served again. The record says the chip
    counted installs, so a chip without the counter (or with a fresh one never counted) is refused."""
    import shutil

    from attest.tpmhelp import tpm_machine

    from codemoat import paths
    from codemoat.attest.tpm import CRL_NV_INDEX, TpmAttestor, _pt
    from codemoat.vault.clock import ClockGuard

    machine = tpm_machine(swtpm, vendor)
    moat, lic, doc = bundle(vendor, model, tmp_path / "out", machine)
    lid = doc["license"]["id"]
    assert verify_bundle(moat, lic)["ok"]  # its first license pins the vendor
    crl.install(_crl(vendor, tmp_path, "old.crl", machines=["m_other"], reason="lost"))
    home = paths.home()
    backup = tmp_path / "backup"
    shutil.copytree(home, backup)
    crl.install(_crl(vendor, tmp_path, "new.crl", licenses=[lid], reason="unpaid"))
    with pytest.raises(VaultError, match="unpaid"):
        verify_bundle(moat, lic)
    guard = ClockGuard(machine)
    shutil.copy2(backup / "clock.json", guard.path)
    name = crl.installed_path(doc["license"]["vendor_key"]).name
    shutil.copy2(backup / "crl" / name, home / "crl" / name)
    with TpmAttestor(swtpm.tcti) as a:  # what tpm2_nvundefine does
        pt = _pt()
        a.ctx.nv_undefine_space(a.ctx.tr_from_tpmpublic(CRL_NV_INDEX), pt.ESYS_TR.OWNER)
        assert a.crl_count() is None
    with pytest.raises(VaultError, match="no CRL counter") as e:
        verify_bundle(moat, lic)
    assert "\n" not in str(e.value)
    with TpmAttestor(swtpm.tcti) as a:  # a fresh counter defined there, never counted
        a._counter(CRL_NV_INDEX, create=True, what="CRL counter")
        assert a.crl_count() is None
    with pytest.raises(VaultError, match="no CRL counter"):
        verify_bundle(moat, lic)
