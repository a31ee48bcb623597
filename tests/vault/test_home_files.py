"""Attacker's tests: a file codemoat writes in its own home ($CODEMOAT_HOME, 0700) and reads back later,
found replaced by a FIFO or a symbolic link.

Before `paths.read_own`, each was read with a plain open: a FIFO put in its place blocked the reader
for good (the open waits for a writer: a serve or `license` command hung at start), and a link was
followed to whatever file it named. Each is now opened with O_NOFOLLOW | O_NONBLOCK and refused in
one line unless a regular file (the CPU self-test cache, which only saves a test, is ignored
instead). The link cases point at a valid copy of the real file, which the code before accepted."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import pytest

from codemoat import paths


def _clock(home: Path):
    from codemoat.vault.clock import ClockGuard
    from codemoat.vault.machine import MachineKey

    key = MachineKey.load_or_create()  # writes clock.json too
    return home / "clock.json", lambda: ClockGuard(key).read()


def _machine_key(home: Path):
    from codemoat.vault.machine import MachineKey

    MachineKey.load_or_create()
    return home / "machine.key", MachineKey.load


def _tpm(home: Path):
    from codemoat.vault.machine import TPM_FILE, MachineKey

    MachineKey.load_or_create()
    (home / TPM_FILE).write_text(json.dumps({"tcti": "swtpm:port=1", "identity": {}}))
    return home / TPM_FILE, MachineKey.load


def _update_state(home: Path):
    from codemoat.updates.store import UpdateStore
    from codemoat.vault.machine import MachineKey

    MachineKey.load_or_create()
    store = UpdateStore()
    store.state_path.write_text(json.dumps({"format": 1, "channels": {}, "bundles": {}}))
    return store.state_path, store.state


def _installed_crl(home: Path):
    from codemoat.vault import crl, vendor_crl
    from codemoat.vault.machine import MachineKey
    from codemoat.vault.trust import check_trusted_vendor
    from codemoat.vault.vendor import Vendor

    MachineKey.load_or_create()
    v = Vendor.init(home.parent / "vendor")
    check_trusted_vendor(v.vendor_key_b64)  # pinned by its first license
    crl.install(json.dumps(vendor_crl.build(v)).encode())
    key = v.vendor_key_b64
    v.close()
    return crl.installed_path(key), lambda: crl._installed(key, None)


def _trusted_vendors(home: Path):
    from codemoat.vault.trust import check_trusted_vendor, trusted_vendors

    check_trusted_vendor("AAAA")
    return home / "trusted-vendors.json", trusted_vendors


def _outbound(home: Path):
    from codemoat.audit.outbound import outbound_file, read_outbound

    outbound_file().write_text('{"host": "127.0.0.1"}\n')
    return outbound_file(), read_outbound


def _audit_head_file(home: Path):
    from codemoat.audit.verify import _check_head_file, _read_head_file

    p = home / "audit-head-x.json"
    p.write_bytes(b"")  # no slot written yet: nothing to check, nothing wrong
    # verify reads the file first (c87c208: before its database snapshot), then checks what it read
    return p, lambda: _check_head_file(p, _read_head_file(p), None, None, 0, None) or None


def _verified_head(home: Path):
    from codemoat.audit import trusted
    from codemoat.audit.chain import SignedHead

    p = home / "audit-verified-x.json"
    trusted.remember(p, SignedHead(seq=1, hash="00" * 32, last_checkpoint=0, ts_us=1, key_id="k", signature="s"), None)
    return p, lambda: trusted.load(p, own=True)


def _cpu_cache(home: Path):
    from codemoat.engines import cpu

    cpu.remember("k", cpu.Choice(True, "fast"))
    return home / cpu.CACHE_FILE, lambda: cpu.cached("k")


#: file -> (plant the real file, return its path and the call that reads it back), what a refusal says
CASES: dict[str, Callable[[Path], tuple[Path, Callable[[], Any]]]] = {
    "clock.json": _clock,
    "machine.key": _machine_key,
    "tpm.json": _tpm,
    "updates/state.json": _update_state,
    "crl/KEY.crl": _installed_crl,
    "trusted-vendors.json": _trusted_vendors,
    "outbound.jsonl": _outbound,
    "audit head file": _audit_head_file,
    "audit verified head": _verified_head,
    "CPU self-test cache": _cpu_cache,
}
IGNORED = {"CPU self-test cache"}  # only a cache: a bad one is a miss, not an error


def _call(fn: Callable[[], Any], fifo: Path | None) -> tuple[str, Any]:
    """('ok', value) or ('error', exception); fails the test when fn waits on the FIFO (then released)."""
    got: list[tuple[str, Any]] = []

    def run() -> None:
        try:
            got.append(("ok", fn()))
        except Exception as e:  # noqa: BLE001 - the test looks at what was raised
            got.append(("error", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(15)
    if t.is_alive():  # the code before the fix: the other end arrives to release the blocked open, then fail
        assert fifo is not None
        ends = [os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)]  # releases a writer's open
        try:
            ends.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # and a reader's
        except OSError:
            pass
        t.join(15)
        for fd in ends:
            os.close(fd)
        pytest.fail("the call blocked on a FIFO put in the home")
    return got[0]


@pytest.mark.parametrize("kind", ["fifo", "link"])
@pytest.mark.parametrize("name", list(CASES))
def test_a_fifo_or_link_in_place_of_a_home_file_is_refused_in_one_line(vault_home, tmp_path, name, kind):
    path, read = CASES[name](paths.home())
    assert _call(read, None)[0] == "ok"  # the real file reads
    saved = tmp_path / "copy"
    shutil.copyfile(path, saved)
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink(saved, path)  # a valid copy elsewhere: the code before read it as its own
    how, got = _call(read, path if kind == "fifo" else None)
    if name in IGNORED:
        assert (how, got) == ("ok", None), got
        return
    want = "not a regular file" if kind == "fifo" else "is a symbolic link"
    if how == "ok" and isinstance(got, list):  # the head-file check answers with problems, not raises
        how, got = "error", got[0][1] if got else None
    assert how == "error", f"{kind} in place of {name} was read: {got!r}"
    msg = str(got)
    assert want in msg and str(path) in msg and "\n" not in msg, msg


def _clock_lock(home: Path):
    from codemoat.vault.clock import ClockGuard
    from codemoat.vault.machine import MachineKey

    guard, later = ClockGuard(MachineKey.load_or_create()), itertools.count(int(time.time()) + 60, 60)
    return home / "clock.json.lock", lambda: guard.raise_floor(next(later))  # each call writes


def _clock_tmp(home: Path):
    from codemoat.vault.clock import ClockGuard
    from codemoat.vault.machine import MachineKey

    guard, later = ClockGuard(MachineKey.load_or_create()), itertools.count(int(time.time()) + 60, 60)
    return home / "clock.json.tmp", lambda: guard.raise_floor(next(later))


def _verified_lock(home: Path):
    from codemoat.audit import trusted
    from codemoat.audit.chain import SignedHead

    p = home / "audit-verified-x.json"
    head = SignedHead(seq=1, hash="00" * 32, last_checkpoint=0, ts_us=1, key_id="k", signature="s")
    return p.with_name(p.name + ".lock"), lambda: trusted.remember(p, head, None)


def _crl_tmp(home: Path):
    from codemoat.vault import crl, vendor_crl
    from codemoat.vault.codec import b64e, canonical, sign
    from codemoat.vault.machine import MachineKey
    from codemoat.vault.trust import check_trusted_vendor
    from codemoat.vault.vendor import Vendor

    MachineKey.load_or_create()
    v = Vendor.init(home.parent / "vendor")
    check_trusted_vendor(v.vendor_key_b64)  # pinned by its first license
    later = itertools.count(1)

    def install() -> Any:  # each call installs a newer CRL (same number: nothing is written)
        doc = vendor_crl.build(v)
        doc["crl"]["number"] = next(later)
        doc["signature"] = b64e(sign(v.signing_key, crl.DOMAIN, canonical(doc["crl"])))
        return crl.install(json.dumps(doc).encode())

    return crl.installed_path(v.vendor_key_b64).with_suffix(".tmp"), install


def _update_state_tmp(home: Path):
    from codemoat.updates.store import UpdateStore
    from codemoat.vault.machine import MachineKey

    MachineKey.load_or_create()
    store = UpdateStore()  # written as `update fail` writes it (no reconcile first to remove a planted file)
    return store.root / "state.json.tmp", lambda: store._write_state(store.state())


#: files codemoat opens to write in its home (a lock, a secret's temporary file) -> the call that does
WRITES: dict[str, Callable[[Path], tuple[Path, Callable[[], Any]]]] = {
    "clock.json.lock": _clock_lock,
    "clock.json.tmp": _clock_tmp,
    "audit verified head's lock": _verified_lock,
    "crl/KEY.tmp": _crl_tmp,
    "updates/state.json.tmp": _update_state_tmp,
}


@pytest.mark.parametrize("kind", ["fifo", "link"])
@pytest.mark.parametrize("name", list(WRITES))
def test_a_fifo_or_link_in_place_of_a_lock_or_secret_it_writes_is_refused(vault_home, tmp_path, name, kind):
    """Was open: the clock record's and the verified head's lock files were opened with open(..., "a"),
    which waits for good for a reader of a FIFO; a secret's file (clock.json.tmp, tpm.json, the vendor's
    keys) was written through a link, to wherever it led, and clock.json.tmp's link was then renamed into
    place as clock.json. Each is now opened O_NOFOLLOW | O_NONBLOCK and must be a regular file."""
    path, write = WRITES[name](paths.home())
    assert _call(write, None)[0] == "ok"
    path.unlink(missing_ok=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"")
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink(elsewhere, path)
    how, got = _call(write, path if kind == "fifo" else None)
    assert how == "error", f"{kind} in place of {name} was written: {got!r}"
    msg = str(got)
    want = "not a regular file" if kind == "fifo" else "is a symbolic link"
    assert want in msg and str(path) in msg and "\n" not in msg, msg
    assert elsewhere.read_bytes() == b""  # nothing written where the link led
