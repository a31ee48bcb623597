"""Licenses (.lic): signed JSON that binds a sealed model to a customer, machines, dates and features.

    {"kind": "codemoat-license", "version": 1, "license": {...}, "signature": base64}

The signature is Ed25519 over "codemoat-license-v1\\0" + the canonical JSON of "license".
An offline license carries the content key wrapped to the machine's X25519 key; a lease
license names the key server and its public key instead (codemoat.vault.lease). Verifying
checks, in order: signature, vendor, revocation (the vendor's installed CRL, codemoat.vault.crl),
model, customer, machine key, hardware facts, clock.
A machine entry with a "tpm" block (`binding: "tpm"`) binds to the chip: an offline content key
is wrapped to its P-256 unwrap key (codemoat.vault.tpmwrap) under the PCR policy named there, and
only that chip, with those PCR values, can unwrap it; a lease for it needs a fresh quote.
Issuing one (signing it, wrapping its keys) is `vault.license_issue`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import paths
from .clock import ClockGuard, iso
from .codec import VaultError, b64d, b64e, canonical, ed_public, key_id, unwrap, verify
from .container import SealedFile, content_key_id
from .crl import check_revoked, chip_ak
from .machine import POLICIES, MachineKey, check_tpm_block, match_facts
from .snpbind import check_snp_block
from .tpmstart import TpmStart
from .trust import check_trusted_vendor

KIND = "codemoat-license"
VERSION = 1
DOMAIN = b"codemoat-license-v1"
FEATURES = ("complete", "chat", "index")
MODES = ("offline", "lease")
MAX_FILE = 16 << 20  # a license naming 1,000 TPM-bound machines is about 3 MB


def key_context(purpose: str, license_id: str, extra: bytes = b"") -> bytes:
    return purpose.encode() + b"\x00" + license_id.encode() + b"\x00" + extra


@dataclass
class License:
    """A parsed license whose signature has been checked against the vendor key it names."""

    body: dict[str, Any]
    raw: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.body[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def load(cls, path: str | Path) -> License:
        return cls.parse(paths.read_regular(path, "license file", MAX_FILE, VaultError))

    @classmethod
    def parse(cls, data: bytes) -> License:
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise VaultError("license is not valid JSON") from None
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            raise VaultError("not a codemoat license")
        if doc.get("version") != VERSION:
            raise VaultError(f"license version {doc.get('version')!r} is not supported")
        body = doc.get("license")
        if not isinstance(body, dict):
            raise VaultError("license body is missing")
        try:
            signed = canonical(body)
        except (ValueError, RecursionError):
            raise VaultError("license body is not canonical JSON") from None
        vk = ed_public(body.get("vendor_key"), "license vendor key")
        verify(vk, b64d(doc.get("signature"), "license signature"), DOMAIN, signed, "license")
        _check_shape(body)
        return cls(body, doc)

    @property
    def vendor_key_id(self) -> str:
        return key_id(b64d(self.body["vendor_key"]))

    def describe(self) -> dict[str, Any]:
        """What `inspect` shows: every field except the wrapped keys' ciphertext."""
        b = self.body
        d = {k: v for k, v in b.items() if k not in ("keys", "machines")}
        d.update(
            kind="license",
            vendor_key_id=self.vendor_key_id,
            not_before_iso=iso(b["not_before"]),
            expires_iso=iso(b["expires"]),
            issued_at_iso=iso(b["issued_at"]),
            support_until_iso=iso(b["support_until"]) if b.get("support_until") is not None else None,
            machines=[m["id"] for m in b["machines"]],
            content_key_included=b["keys"] is not None,
        )
        return d


def _check_shape(b: dict[str, Any]) -> None:
    """Types of every field a verifier reads (the signature already says the vendor wrote them)."""

    def need(name: str, typ: type | tuple) -> Any:
        v = b.get(name)
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise VaultError(f"license field {name!r} is missing or malformed")
        return v

    for name in ("id", "customer", "customer_id", "mode", "match_policy"):
        need(name, str)
    for name in ("issued_at", "not_before", "expires"):
        need(name, int)
    need("watermark", bool)
    su = b.get("support_until")  # optional: absent on licenses issued before support contracts
    if su is not None and (not isinstance(su, int) or isinstance(su, bool)):
        raise VaultError("license field 'support_until' is malformed")
    if b["mode"] not in MODES or b["match_policy"] not in POLICIES:
        raise VaultError("license mode or match policy is unknown")
    model = need("model", dict)
    if not all(isinstance(model.get(k), str) for k in ("file_id", "manifest_sha256", "key_id", "model_id", "format")):
        raise VaultError("license field 'model' is malformed")
    feats = need("features", list)
    if not all(isinstance(f, str) for f in feats):
        raise VaultError("license field 'features' is malformed")
    machines = need("machines", list)
    if not machines or not all(
        isinstance(m, dict) and isinstance(m.get("id"), str) and isinstance(m.get("facts"), dict) for m in machines
    ):
        raise VaultError("license field 'machines' is malformed")
    for m in machines:
        if m.get("binding", "software") not in ("software", "tpm") or (m.get("binding") == "tpm") != ("tpm" in m):
            raise VaultError("license field 'machines' is malformed")
        if "tpm" in m:
            check_tpm_block(m["tpm"])
        if "snp" in m:
            check_snp_block(m["snp"])
    if b["mode"] == "offline":
        keys = need("keys", dict)
        if len(machines) != 1 or not isinstance(keys.get("content_key"), dict):
            raise VaultError("offline license must name one machine and carry its content key")
    else:
        lease = need("lease", dict)
        if not (
            isinstance(lease.get("url"), str)
            and isinstance(lease.get("server_key"), str)
            and all(
                isinstance(lease.get(k), int) and not isinstance(lease.get(k), bool) and lease[k] > 0
                for k in ("ttl", "grace", "seats")
            )
        ):
            raise VaultError("license field 'lease' is malformed")
        cap = lease.get("max_seats_per_machine")
        if cap is not None and (type(cap) is not int or not 1 <= cap <= lease["seats"]):
            raise VaultError("license field 'lease.max_seats_per_machine' is malformed")


@dataclass
class Grant:
    """A license that holds on this machine: what the loader needs."""

    license: License
    machine_entry: dict[str, Any]
    content_key: bytes | None
    watermark_key: bytes | None
    now: float
    pending: TpmStart | None = None  # the watermark key's unwrap, still in the chip (`defer_watermark`)

    def settle(self) -> bytes | None:
        """The watermark key, once a deferred unwrap is done (raising the chip's refusal, if any)."""
        if self.pending is not None:
            try:
                self.watermark_key = self.pending.key(1) if len(self.pending.unwraps) > 1 else None
            finally:
                self.pending.close()
                self.pending = None
        return self.watermark_key

    def close(self) -> None:
        """Wait out a deferred unwrap without its result (a start that failed)."""
        if self.pending is not None:
            self.pending.close()
            self.pending = None


def check(
    lic: License,
    sealed: SealedFile,
    machine: MachineKey,
    guard: ClockGuard,
    *,
    trust_path: Path | None = None,
    defer_watermark: bool = False,
    chip: TpmStart | None = None,
) -> Grant:
    """Every offline check of `lic` against `sealed` on `machine`; the first failure raises. On a machine
    whose keys are in a TPM the chip's part runs in a thread beside the other checks (`vault.tpmstart`);
    `chip`: that part as `start_chip` started it earlier (this call then owns it). `defer_watermark`: return
    once the content key is out, and let `Grant.settle()` wait for the watermark key's unwrap (a start overlaps
    it with the decryption; `Grant.close()` when it fails)."""
    b = lic.body
    entry = next((x for x in b["machines"] if x["id"] == machine.id), None)
    tpm = chip if chip is not None else _tpm_start(b, entry, machine)
    try:
        grant = _check(lic, sealed, machine, guard, entry, tpm, trust_path)
        if grant.pending is None and tpm is not None:
            tpm.close()  # the CRL counter alone (done by now)
        elif not defer_watermark:
            grant.settle()
        return grant
    except BaseException:
        if tpm is not None:
            tpm.close()
        raise


def start_chip(lic: License, machine: MachineKey) -> TpmStart | None:
    """`check`'s chip part for `lic` on `machine`, started now by a caller with other work to do first (a start
    opens the sealed file and allocates its memfd meanwhile); pass it to `check(..., chip=)`, or `close()` it when
    `check` is not reached. None on a machine without a TPM."""
    b = lic.body
    return _tpm_start(b, next((x for x in b["machines"] if x["id"] == machine.id), None), machine)


def _tpm_start(b: dict[str, Any], entry: dict[str, Any] | None, machine: MachineKey) -> TpmStart | None:
    """The chip's part of the check, started now; None when this machine's keys are not in a TPM."""
    if not getattr(machine, "tpm", None):
        return None
    unwraps = []
    if b["mode"] == "offline" and entry is not None and entry.get("binding") == "tpm":
        unwraps.append((b["keys"]["content_key"], key_context("content-key", b["id"]), "content key"))
        if b["keys"].get("watermark_key") is not None:
            unwraps.append((b["keys"]["watermark_key"], key_context("watermark-key", b["id"]), "watermark key"))
    return TpmStart(machine.start_chip(), entry, unwraps, chip_ak(entry, machine))


def _check(
    lic: License,
    sealed: SealedFile,
    machine: MachineKey,
    guard: ClockGuard,
    entry: dict[str, Any] | None,
    tpm: TpmStart | None,
    trust_path: Path | None,
) -> Grant:
    b, m = lic.body, sealed.manifest
    if b["vendor_key"] != m.vendor_key:
        raise VaultError(
            f"license (vendor {lic.vendor_key_id}) and sealed file (vendor {sealed.vendor_key_id}) come from different vendors"
        )
    check_trusted_vendor(b["vendor_key"], trust_path)
    home = trust_path.parent if trust_path else None
    check_revoked(b, machine.id, guard, home, tpm if guard.machine is machine else None)  # the vendor's installed CRL
    if b["model"]["file_id"] != m.file_id or b["model"]["manifest_sha256"] != sealed.manifest_sha256:
        raise VaultError(f"license is for another model (sealed file {b['model']['file_id'][:12]}…, this is {m.file_id[:12]}…)")
    if b["customer_id"] != m.customer_id or b["customer"] != m.customer:
        raise VaultError(f"license is for customer {b['customer']!r}, but the model is sealed for {m.customer!r}")
    if entry is None:
        names = ", ".join(x["id"] for x in b["machines"][:3])
        raise VaultError(f"license is for another machine ({names}); this machine is {machine.id}")
    if entry.get("x25519") != b64e(machine.x25519_public) or entry.get("ed25519") != b64e(machine.ed25519_public):
        raise VaultError(f"license machine entry does not match this machine's keys ({machine.id})")
    ok, hit, total = match_facts(entry["facts"], machine.facts, b["match_policy"])
    if not ok:
        raise VaultError(
            f"this machine's hardware does not match the license: {hit} of {total} facts match, policy {b['match_policy']!r}"
        )
    now = guard.check()
    if now < b["issued_at"] - guard.tolerance:
        raise VaultError(f"system clock is set back: it reads {iso(now)}, before the license was issued ({iso(b['issued_at'])})")
    if now < b["not_before"]:
        raise VaultError(f"license is not valid until {iso(b['not_before'])}")
    if now >= b["expires"]:
        raise VaultError(f"license expired on {iso(b['expires'])}")
    content = wm = None
    if b["mode"] == "offline" and tpm is not None and tpm.unwraps:  # bound to this machine's chip
        tpm.release()
        content = tpm.key(0)
        if content_key_id(content) != m.key_id:
            raise VaultError("license content key does not open this sealed file")
        return Grant(lic, entry, content, None, now, pending=tpm)
    if b["mode"] == "offline":
        if entry.get("binding") == "tpm":
            machine.attestor()  # bound to a TPM this machine has not set up: says so
        content = unwrap(machine.x25519, b["keys"]["content_key"], key_context("content-key", b["id"]), "content key")
        if content_key_id(content) != m.key_id:
            raise VaultError("license content key does not open this sealed file")
        if b["keys"].get("watermark_key") is not None:
            wm = unwrap(machine.x25519, b["keys"]["watermark_key"], key_context("watermark-key", b["id"]), "watermark key")
    return Grant(lic, entry, content, wm, now)
