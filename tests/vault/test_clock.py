"""Rolling the clock back by replaying a saved `clock.json`: the floor comes from more than that file."""

from __future__ import annotations

import os
import shutil

import pytest

from codemoat.vault.clock import ClockGuard, ManualClock
from codemoat.vault.codec import VaultError
from codemoat.vault.lease import LeaseClient
from codemoat.vault.license import License
from codemoat.vault.verify import verify_bundle
from .conftest import KeyServerProcess
from vaulthelp import bundle


def _save(path, to):
    shutil.copy2(path, to)  # bytes and times, as a careful attacker keeps them


def test_a_saved_clock_record_put_back_after_setting_the_clock_back_is_refused(vendor, machine, model, tmp_path):
    moat, lic, _ = bundle(vendor, model, tmp_path / "a", machine, days=30)
    clock = ManualClock()
    t0 = clock.time()
    guard = ClockGuard(machine, clock)
    assert verify_bundle(moat, lic, clock=clock)["ok"]
    _save(guard.path, tmp_path / "clock.saved")  # 1. save the record while the license is valid
    clock.advance(31 * 86400)  # 2. the license expires (this machine saw the date)
    with pytest.raises(VaultError, match="license expired"):
        verify_bundle(moat, lic, clock=clock)
    clock.set_wall(t0 + 86400)  # 3. set the clock back to inside the license's dates
    _save(tmp_path / "clock.saved", guard.path)  # 4. restore the saved record
    assert guard.read() < t0 + 3600  # the restored record is authentic: its tag is valid
    with pytest.raises(VaultError, match="system clock is set back.*machine.key"):
        verify_bundle(moat, lic, clock=clock)  # still refused


@pytest.mark.parametrize("written", ["codemoat.db", "audit-head-0123abcd.json"])
def test_files_the_service_wrote_raise_the_floor(vendor, machine, model, tmp_path, written):
    """The record and machine.key's time both put back: the audit database written at the later date still counts."""
    moat, lic, _ = bundle(vendor, model, tmp_path / "a", machine, days=30)
    clock = ManualClock()
    t0 = clock.time()
    guard = ClockGuard(machine, clock)
    key = guard.path.with_name("machine.key")
    _save(guard.path, tmp_path / "clock.saved")
    stamp = os.stat(key).st_mtime
    clock.advance(31 * 86400)
    db = guard.path.with_name(written)
    db.write_bytes(b"")
    os.utime(db, (clock.time(), clock.time()))  # the server's audit log, written on the later date
    with pytest.raises(VaultError, match="license expired"):
        verify_bundle(moat, lic, clock=clock)
    clock.set_wall(t0 + 86400)
    _save(tmp_path / "clock.saved", guard.path)
    os.utime(key, (stamp, stamp))
    with pytest.raises(VaultError, match=f"system clock is set back.*{written}"):
        verify_bundle(moat, lic, clock=clock)
    os.utime(db, (stamp, stamp))  # every file's time put back too: software on the owner's machine stops here
    assert verify_bundle(moat, lic, clock=clock)["ok"]


def test_a_key_servers_signed_time_raises_the_floor(vendor, machine, model, tmp_path):
    server_clock = ManualClock()
    server_clock.advance(40 * 86400)  # the key server's time is 40 days ahead of this machine's
    ks = KeyServerProcess(vendor, clock=server_clock).start()
    try:
        _, lease_lic, _ = bundle(vendor, model, tmp_path / "l", machine, mode="lease", keyserver=ks.url, days=60)
        LeaseClient(License.load(lease_lic), machine).acquire()
    finally:
        ks.stop()
    guard = ClockGuard(machine)
    assert guard.read() >= int(server_clock.time())  # the signed server time is the mark now
    moat, lic, _ = bundle(vendor, model, tmp_path / "o", machine, days=30, customer="bolt")
    with pytest.raises(VaultError, match="system clock is set back"):  # an offline license, by this clock
        verify_bundle(moat, lic)
