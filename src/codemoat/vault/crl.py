"""Revocation lists (CRLs) for licenses the key server never sees: the vendor revokes a license or a
machine offline, the customer installs the signed list, and a revoked license refuses to start.

    {"kind": "codemoat-crl", "version": 1, "crl": {...}, "signature": base64}

`crl` is {"number", "issued_at", "vendor_key", "revoked": [{"kind", "id", "reason", "revoked_at"}, ...]};
the signature is Ed25519 by the vendor's signing key (the one that signs licenses) over
"codemoat-crl-v1\\0" + the canonical JSON of `crl` (docs/formats.md). Every CRL lists every revocation
so far: it replaces the installed one, never adds to it. Its number is the highest revocation sequence
number in the vendor database, so a later CRL has a higher one; a machine refuses a CRL numbered below
the one it holds (an old list would un-revoke), one with the same number and other contents, one
signed by a vendor key it does not trust, and any edited one (the signature).

A machine keeps one CRL per vendor key, `$CODEMOAT_HOME/crl/<vendor key id>.crl`; `license.check`
(serve, verify, updates) reads it and verifies it again, so an edited file refuses to start (fail
closed). The number of the latest CRL installed is also kept in the clock record (vault.clock, tagged
under a key derived from the machine key), so a deleted CRL, or an older one put back, refuses to
start too. Never installing the CRL is not detected, nor is a restore of the clock record itself
from a backup: docs/threat-model.md.

On a machine whose keys are in a TPM every install also counts in an NV counter, and the record keeps the
count it reached: a record put back from before an install is behind the chip. `codemoat machine-id --tpm`
defines the counter and the record starts at its count ("tpm-base"); the vendor signs that count into the
license's TPM block ("crl"). So a chip without the counter (deleted with owner authorization) is refused,
and so is one whose counter was defined again since (a record whose base is above the licensed count),
even with a record from before the first install. Licenses whose TPM block names no counter still load,
with a warning: for them that case is not detected.

The vendor's side, recording revocations and signing the list, is `vault.vendor_crl`.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import paths
from .clock import TPM_BASE, TPM_COUNT, ClockGuard, iso
from .machine import MachineKey
from .codec import VaultError, b64d, canonical, ed_public, key_id, verify
from .trust import TRUST_FILE, check_trusted_vendor

log = logging.getLogger("codemoat.vault")

KIND = "codemoat-crl"
VERSION = 1
DOMAIN = b"codemoat-crl-v1"
KINDS = ("license", "machine")


@dataclass
class Crl:
    """A parsed CRL whose signature holds for the vendor key it names."""

    body: dict[str, Any]

    @property
    def number(self) -> int:
        return self.body["number"]

    @property
    def vendor_key_id(self) -> str:
        return key_id(b64d(self.body["vendor_key"]))

    @classmethod
    def parse(cls, data: bytes) -> Crl:
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise VaultError("CRL is not valid JSON") from None
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            raise VaultError("not a codemoat CRL")
        if doc.get("version") != VERSION:
            raise VaultError(f"CRL version {doc.get('version')!r} is not supported")
        body = doc.get("crl")
        if not isinstance(body, dict):
            raise VaultError("CRL body is missing")
        try:
            signed = canonical(body)
        except (ValueError, RecursionError):
            raise VaultError("CRL body is not canonical JSON") from None
        verify(
            ed_public(body.get("vendor_key"), "CRL vendor key"),
            b64d(doc.get("signature"), "CRL signature"),
            DOMAIN,
            signed,
            "CRL",
        )
        _check_shape(body)
        return cls(body)

    def find(self, kind: str, subject: str) -> dict[str, Any] | None:
        return next((e for e in self.body["revoked"] if e["kind"] == kind and e["id"] == subject), None)


def _check_shape(b: dict[str, Any]) -> None:
    def whole(v: Any) -> bool:
        return type(v) is int and v >= 0

    rev = b.get("revoked")
    if not (whole(b.get("number")) and whole(b.get("issued_at")) and isinstance(rev, list)):
        raise VaultError("CRL fields 'number', 'issued_at' or 'revoked' are missing or malformed")
    for e in rev:
        if not (
            isinstance(e, dict)
            and e.get("kind") in KINDS
            and isinstance(e.get("id"), str)
            and isinstance(e.get("reason"), str)
            and whole(e.get("revoked_at"))
        ):
            raise VaultError("CRL entry is malformed")


def installed_path(vendor_key_b64: str, home: Path | None = None) -> Path:
    return (home or paths.home()) / "crl" / f"{key_id(b64d(vendor_key_b64, 'vendor key'))}.crl"


def _installed(vendor_key_b64: str, home: Path | None) -> Crl | None:
    """The CRL installed for this vendor key, verified again; None when there is none."""
    p = installed_path(vendor_key_b64, home)
    try:
        data = paths.read_own(p, "CRL", MAX_FILE, VaultError)  # a FIFO or a link put in the home: one line
    except FileNotFoundError:
        return None
    try:
        crl = Crl.parse(data)
    except VaultError as e:
        raise VaultError(f"the installed CRL {p} does not verify ({e}): install the vendor's latest CRL again") from None
    if crl.body["vendor_key"] != vendor_key_b64:
        raise VaultError(f"the installed CRL {p} is another vendor's: install the vendor's latest CRL again")
    return crl


_warned: set[str] = set()


def chip_ak(entry: dict[str, Any] | None, machine: Any) -> str | None:
    """The attestation key that must certify the TPM's CRL counter: the one the license's machine entry names
    (signed by the vendor), else this machine's own (tpm.json)."""
    ak = ((entry or {}).get("tpm") or {}).get("ak")
    return ak or ((getattr(machine, "tpm", None) or {}).get("identity") or {}).get("ak")


def _tpm_behind(
    guard: ClockGuard, attestor: Any, named: dict[str, Any] | None = None, lid: str = "", ak: str | None = None
) -> None:
    """On a machine whose keys are in a TPM: refuse a clock record behind the TPM's CRL counter. Every
    install counts there, so a record put back from before an install (with an older CRL, or none) is;
    and a record that says the chip counted installs, on a chip without the counter. `named`: the counter
    and its count at provisioning as license `lid` names them (signed by the vendor), which also refuses a
    chip without it, and a counter defined again since, whatever the record says. The count is the one the chip's
    AK (`ak`, else this machine's) certifies: a proxy on the TCTI could answer TPM2_NV_Read with an older one."""
    count = attestor.crl_count(ak=ak or chip_ak(None, guard.machine))
    recorded, base = guard.crl_number(TPM_COUNT), guard.crl_number(TPM_BASE)
    if named is None and lid and lid not in _warned:
        _warned.add(lid)
        log.warning(
            "license %s names no TPM CRL counter (its machine identity predates it): a counter deleted with owner "
            "authorization together with a clock record from before the first CRL install is not detected; ask the "
            "vendor to reissue it from a fresh `codemoat machine-id --tpm`",
            lid,
        )
    if count is None and named:  # another chip (a copied home), or deleted with owner authorization
        raise VaultError(
            f"license is sealed to another TPM, or this one's CRL counter was deleted: this machine's TPM has no CRL "
            f"counter, but license {lid} (signed by the vendor) names it, defined at provisioning with count "
            f"{named['count']} (a copied data directory, another machine, or the TPM cleared): the vendor must reprovision"
        )
    if count is None and recorded:  # deleted with owner authorization (or a fresh one defined there, never counted)
        raise VaultError(
            f"this machine's TPM has no CRL counter, but the clock record {guard.path} says it counted {recorded} CRL "
            "installs (the counter was deleted, or the TPM cleared): the vendor must reprovision this machine"
        )
    if named is not None and base is not None and base > named["count"]:
        raise VaultError(
            f"this machine's TPM CRL counter was defined again after license {lid} was issued (the clock record "
            f"follows it from count {base}, the license names {named['count']}): the counter was deleted, and the "
            "record and CRL may be from a backup; the vendor must reprovision this machine"
        )
    if recorded is None and named is not None:
        recorded = named["count"]  # no install since provisioning: the chip must still be at the licensed count
    if count is not None and (recorded is None or recorded < count):
        raise VaultError(
            f"the clock record {guard.path} is older than this machine's TPM: the TPM counted {count} CRL installs, "
            f"the record {recorded or 0} (it was put back from a backup); the vendor must reprovision this machine"
        )


def _tpm(guard: ClockGuard) -> Any:
    """The machine's TPM, not yet open, or None when its keys are not in one."""
    m = guard.machine
    return m.attestor() if getattr(m, "tpm", None) else None


def _current(
    vendor_key_b64: str,
    guard: ClockGuard,
    home: Path | None,
    tpm: Any = None,
    named: dict[str, Any] | None = None,
    lid: str = "",
    ak: str | None = None,
) -> Crl | None:
    """The installed CRL, refused when it is missing or older than the one the clock record says this
    machine installed (a deleted crl folder, an old CRL put back); the record ratchets up to it. `tpm`:
    what reads the TPM's CRL counter (`crl_count()`) on a connection already open (`vault.tpmstart`);
    `named`, `lid`, `ak`: as `_tpm_behind`'s."""
    if tpm is not None:
        _tpm_behind(guard, tpm, named, lid, ak)
    elif (chip := _tpm(guard)) is not None:
        with chip:
            _tpm_behind(guard, chip, named, lid, ak)
    crl = _installed(vendor_key_b64, home)
    kid = key_id(b64d(vendor_key_b64))
    recorded = guard.crl_number(kid)
    p = installed_path(vendor_key_b64, home)
    if recorded is not None and crl is None:
        raise VaultError(
            f"the CRL {p} is missing, but this machine installed CRL {recorded}: install the vendor's latest CRL again"
        )
    if recorded is not None and crl is not None and crl.number < recorded:
        raise VaultError(
            f"the installed CRL {p} is number {crl.number}, older than CRL {recorded} this machine installed: "
            "install the vendor's latest CRL again"
        )
    if crl is not None and (recorded is None or crl.number > recorded):
        guard.record_crl({kid: crl.number})  # one installed before the record kept CRL numbers
    return crl


MAX_FILE = 64 << 20  # a CRL of 100,000 revocations is about 20 MB


def read_file(path: Path) -> bytes:
    """A CRL file's bytes: a regular file of at most MAX_FILE, else one line (a FIFO would block the
    read for good, /dev/zero would fill memory)."""
    return paths.read_regular(path, "CRL", MAX_FILE, VaultError)


def install(data: bytes, guard: ClockGuard | None = None, home: Path | None = None) -> tuple[Crl, bool]:
    """Verify and install a CRL for a vendor this machine trusts; (the CRL, False when already installed).
    Its number goes into the clock record of `guard` (default: this home's machine key's)."""
    crl = Crl.parse(data)
    guard = guard or ClockGuard(MachineKey.load())
    vk = crl.body["vendor_key"]
    check_trusted_vendor(vk, (home or paths.home()) / TRUST_FILE, "CRL")  # never pins a key
    with ExitStack() as stack:
        tpm = _tpm(guard)
        if tpm is not None:
            stack.enter_context(tpm)
            _tpm_behind(guard, tpm)
        return _install(crl, data, guard, tpm, home)


def _install(crl: Crl, data: bytes, guard: ClockGuard, tpm: Any, home: Path | None) -> tuple[Crl, bool]:
    vk = crl.body["vendor_key"]
    try:
        old = _installed(vk, home)
    except VaultError:  # damaged, edited or another vendor's: start says "install the latest again", so that must work
        old = None  # as if deleted: the number this machine recorded still refuses an older CRL (below)
    recorded = guard.crl_number(crl.vendor_key_id)
    if recorded is not None and crl.number < recorded:
        raise VaultError(f"CRL number {crl.number} is older than the installed one ({recorded}): a CRL cannot be rolled back")
    if old is not None:
        if crl.number < old.number:
            raise VaultError(
                f"CRL number {crl.number} is older than the installed one ({old.number}): a CRL cannot be rolled back"
            )
        if crl.number == old.number:
            if canonical(crl.body["revoked"]) != canonical(old.body["revoked"]):
                raise VaultError(f"a different CRL with the same number ({crl.number}) is installed: refused")
            return old, False
    p = installed_path(vk, home)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    fd = paths.open_own(tmp, "CRL being installed", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, VaultError)  # no link, no FIFO
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, p)
    if tpm is None:
        guard.record_crl({crl.vendor_key_id: crl.number})
        return crl, True
    # The record first, ahead of the TPM (a crash in between leaves it ahead, which start accepts), then the count.
    now = tpm.crl_count(create=True)
    numbers = {crl.vendor_key_id: crl.number, TPM_COUNT: now + 1}
    if guard.crl_number(TPM_COUNT) is None:  # the first install this record follows (see TPM_BASE)
        numbers[TPM_BASE] = now
    guard.record_crl(numbers)
    counted = tpm.crl_count_up()
    if counted != now + 1:  # someone else counted in between: the record must not stay behind the TPM
        guard.record_crl({TPM_COUNT: counted})
    return crl, True


def check_revoked(lic: dict[str, Any], machine_id: str, guard: ClockGuard, home: Path | None = None, tpm: Any = None) -> None:
    """Refuse a license (or this machine) the installed CRL of its vendor revokes, naming the reason,
    and a CRL missing or older than the one this machine installed (`tpm`: as `_current`'s)."""
    entry = next((m for m in lic.get("machines", ()) if m.get("id") == machine_id), None)
    named = (entry or {}).get("tpm", {}).get("crl")  # the CRL counter the vendor signed into this machine's entry
    ak = chip_ak(entry, guard.machine)
    reason = _refusal(_current(lic["vendor_key"], guard, home, tpm, named, lic["id"], ak), lic, machine_id)
    if reason is not None:
        raise VaultError(reason)


def _refusal(crl: Crl | None, lic: dict[str, Any], machine_id: str) -> str | None:
    if crl is None:
        return None
    for kind, subject in (("license", lic["id"]), ("machine", machine_id)):
        e = crl.find(kind, subject)
        if e is not None:
            return f"{kind} {subject} was revoked by the vendor on {iso(e['revoked_at'])}: {e['reason']} (CRL {crl.number})"
    return None


class InstalledWatch:
    """A running server's view of the installed CRL: `revoked()` is the refusal (or None), re-read only
    when the file changes (one stat per call), so a CRL installed under a serving process stops it, and
    one deleted or replaced by an older one than it has seen (start checked the clock record) stops it too."""

    def __init__(self, lic: dict[str, Any], machine_id: str, home: Path | None = None):
        self.lic, self.machine_id, self.home = lic, machine_id, home
        self.path = installed_path(lic["vendor_key"], home)
        self._seen: tuple[int, int, int] | None = None
        self._reason: str | None = None
        self._highest: int | None = None  # the highest CRL number this watch has read

    def revoked(self) -> str | None:
        try:
            st = self.path.stat()
            seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            seen = None
        if seen != self._seen:
            self._seen = seen
            try:
                crl = _installed(self.lic["vendor_key"], self.home)
                if self._highest is not None and (crl is None or crl.number < self._highest):
                    got = "missing" if crl is None else f"number {crl.number}"
                    raise VaultError(f"the CRL {self.path} is {got}, but CRL {self._highest} was installed: install it again")
                if crl is not None:
                    self._highest = crl.number
                self._reason = _refusal(crl, self.lic, self.machine_id)
            except VaultError as e:
                self._reason = str(e)
        return self._reason
