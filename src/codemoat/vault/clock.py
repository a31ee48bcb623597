"""Time for licenses, and a guard against a clock set back to stretch an expired license.

The guard keeps a high-water mark: the latest time this machine has seen, in
`$CODEMOAT_HOME/clock.json`, with an HMAC-SHA256 tag under a key that HKDF derives from the
machine's private X25519 key, so the record cannot be edited without that key. The record is
made together with the machine key; a missing record beside an existing key is refused too.
A clock more than `tolerance` seconds behind the mark is refused.

A valid tag does not make a record current: a copy saved earlier and put back after the clock
was set back carries a valid tag too. So the floor is the highest of several things that a restore
of one file does not roll back: the record; the modification time of `machine.key`, which the
guard sets to each new mark (the key cannot be deleted without losing the machine's identity);
the modification times of the files the service keeps writing (the databases — the audit log and
its signed checkpoints live in `codemoat.db` —, the audit log's signed head files, which exist
for a PostgreSQL database too, and the outbound log); and every time a key server
signed (`raise_floor`, called by the lease client). A license's issue time is a floor too (the
license check refuses a clock before it). Someone who restores the whole data folder, or sets
every file's time back as well, is not stopped by software on a machine they own: a lease license
takes its time from the key server, and a TPM's monotonic clock is the hardware answer.

The record also carries the number of the latest CRL installed per vendor key (`crl`, vault.crl), under
the same tag: deleting the CRL folder or putting back an older CRL is then refused at start, and the
record itself cannot be deleted or edited. A record without CRLs has the tag it always had.
"""

from __future__ import annotations

import fcntl
import hmac
import json
import os
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .. import paths
from ..durations import show_time
from .codec import VaultError, write_secret, x_private_raw

TPM_COUNT = "tpm"  # the clock record's entry for the TPM's CRL counter (vendor key ids are hex)
TPM_BASE = "tpm-base"  # the counter's count when this record started following it (provisioning, or the first install)

RECORD = "clock.json"
STAMP = "machine.key"  # its mtime carries the mark too
# Written while serving: the databases, the audit log's head files (one per database, PostgreSQL too), the outbound log
WRITTEN = (
    "codemoat.db",
    "codemoat.db-wal",
    "index.db",
    "index.db-wal",
    "audit-head-*.json",
    "audit-verified-*.json",
    "outbound.jsonl",
)


class Clock:
    """Wall time (for dates in licenses) and monotonic time (for lease deadlines); tests swap it."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Sleep up to `seconds` or until `event` is set; True when it was set."""
        return event.wait(max(0.0, seconds))


class ManualClock(Clock):
    """A clock that moves only when told to (`advance`); `wait` sleeps a few real milliseconds
    so that threads waiting on it keep polling the manual time."""

    def __init__(self, start: float | None = None):
        self._t = time.time() if start is None else start
        self._m = 1000.0
        self._lock = threading.Lock()

    def time(self) -> float:
        with self._lock:
            return self._t

    def monotonic(self) -> float:
        with self._lock:
            return self._m

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._t += seconds
            self._m += seconds

    def set_wall(self, t: float) -> None:
        """Move only the wall clock (what a user setting the date does); monotonic time goes on."""
        with self._lock:
            self._t = t

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.wait(min(max(0.0, seconds), 0.005))


def iso(t: float | int) -> str:
    """UTC ISO-8601 for a Unix time (`show_time`: an out-of-range one is shown as its number)."""
    return show_time(t)


class ClockGuard:
    """The authenticated high-water mark of this machine's clock."""

    def __init__(self, machine, clock: Clock | None = None, tolerance: float = 300, path: Path | None = None):
        self.clock = clock or Clock()
        self.machine = machine
        self.tolerance = tolerance
        self.path = path or paths.home() / RECORD
        ikm = x_private_raw(machine.x25519)
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"codemoat-clock-hwm-v1").derive(ikm)
        self._lock = threading.Lock()

    def _mac(self, hwm: int, crl: dict[str, int] | None = None) -> str:
        msg = f"codemoat-hwm:{hwm}" + (f":crl:{json.dumps(crl, sort_keys=True)}" if crl else "")
        return hmac.new(self._key, msg.encode(), "sha256").hexdigest()

    def _write(self, hwm: int, crl: dict[str, int] | None = None, *, fresh: bool = False) -> None:
        """Write the record merged with what it holds now, under a lock across processes (a serve raising
        the mark while `license crl install` records a number): neither the mark nor a number moves down.
        `fresh`: a new machine key's first record, which replaces whatever an old key left (its tag cannot
        be checked with the new key, and nothing bound to the old key opens with the new one)."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        with os.fdopen(paths.open_own(lock_path, "lock file", error=VaultError), "r+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old_hwm, old = self._read() if self.path.exists() and not fresh else (0, {})
            hwm = max(hwm, old_hwm)
            crl = {**old, **{k: max(n, old.get(k, -1)) for k, n in (crl or {}).items()}}
            d: dict = {"hwm": hwm, "mac": self._mac(hwm, crl)}
            if crl:
                d["crl"] = crl
            tmp = self.path.with_name(self.path.name + ".tmp")
            write_secret(tmp, json.dumps(d).encode())
            tmp.replace(self.path)
        try:
            os.utime(self.path.with_name(STAMP), (hwm, hwm))
        except OSError:
            pass  # no machine key file beside the record (a key held elsewhere): the record alone

    def start_record(self) -> None:
        self._write(int(self.clock.time()), fresh=True)

    def read(self) -> int:
        return self._read()[0]

    def _read(self) -> tuple[int, dict[str, int]]:
        try:
            d = json.loads(paths.read_own(self.path, "clock record", error=VaultError))
            hwm, mac, crl = d["hwm"], d["mac"], d.get("crl", {})
        except FileNotFoundError:
            raise VaultError(
                f"clock record {self.path} is missing (it is made with the machine key; "
                "deleting it does not reset the clock guard)"
            ) from None
        except (ValueError, KeyError, TypeError):
            raise VaultError(f"clock record {self.path} is damaged") from None
        if (
            not isinstance(hwm, int)
            or not isinstance(mac, str)
            or not isinstance(crl, dict)
            or not all(isinstance(k, str) and type(v) is int for k, v in crl.items())
            or not hmac.compare_digest(mac, self._mac(hwm, crl))
        ):
            raise VaultError(f"clock record {self.path} was altered (its authentication tag does not match)")
        return hwm, crl

    def floor(self) -> tuple[float, str]:
        """The latest time this machine has seen, and what showed it."""
        best, why = float(self.read()), "its clock record"
        folder = self.path.parent
        for pattern in (STAMP, *WRITTEN):
            for p in folder.glob(pattern) if "*" in pattern else (folder / pattern,):
                try:
                    t = os.stat(p).st_mtime
                except OSError:
                    continue
                if t > best:
                    best, why = t, f"{p.name} was written then"
        return best, why

    def check(self) -> float:
        """The current time, after refusing a clock set back beyond tolerance; advances the mark."""
        with self._lock:
            now = self.clock.time()
            floor, why = self.floor()
            if now < floor - self.tolerance:
                raise VaultError(
                    f"system clock is set back: it reads {iso(now)}, but this machine has already seen {iso(floor)} ({why})"
                )
            if int(now) > self.read():
                self._write(int(now))
            return now

    def raise_floor(self, t: int) -> None:
        """Move the mark up to `t`, a time someone this machine trusts signed (a key server's answer)."""
        with self._lock:
            if int(t) > self.read():
                self._write(int(t))

    def crl_number(self, vendor_key_id: str) -> int | None:
        """The number of the latest CRL this machine installed for the vendor key (None: never one);
        `TPM_COUNT`: the TPM's CRL counter as of the last install."""
        return self._read()[1].get(vendor_key_id)

    def record_tpm_provisioned(self, count: int) -> None:
        """`machine-id --tpm` defined the TPM's CRL counter at `count`: this record follows it from there."""
        self.record_crl({TPM_COUNT: count, TPM_BASE: count})

    def record_crl(self, numbers: dict[str, int]) -> None:
        """Record CRL numbers (per vendor key id) this machine installed; each only moves up."""
        with self._lock:
            crl = self._read()[1]
            if any(crl.get(k, -1) < n for k, n in numbers.items()):
                self._write(0, numbers)
