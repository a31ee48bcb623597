"""A bundle's payload checks (docs/formats.md): what `update verify` reads and `update apply` stages.

A model bundle of format 2 carries a sealed model that authenticates itself: the license its
signed manifest carries must grant it on this machine (the license names the .moat's signed
header), and every chunk's AES-GCM tag must hold under the content key that license wraps (each
chunk's associated data holds the header's hash and the chunk's index, so a chunk changed, moved,
cut or added fails). Under a lease (no key here) or in format 1, the payload is checked against
the manifest's signed digests instead, chunk by chunk (updates.bundle). Adapters and knowledge
packs are checked by their digests and then opened (sealed to the customer's machines), so that
what they hold is refused before anything switches. Nothing is kept of a model's plaintext.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..vault.clock import ClockGuard
from ..vault.codec import VaultError
from ..vault.container import SealedFile
from ..vault.license import License, check as check_license
from ..vault.machine import MachineKey
from ..vault.payload import open_payload
from . import packs
from .bundle import Bundle, BundleError, check_gguf, payload_context


def self_authenticated(bundle: Bundle) -> bool:
    """A model bundle of format 2: its sealed model is checked by its own GCM tags when the key is here."""
    return bundle.kind == "model" and bundle.format_version >= 2


def content_key(sealed: SealedFile, m: dict[str, Any], machine: MachineKey, guard: ClockGuard) -> bytes | None:
    """The content key of a model bundle's sealed model, when the license it carries (vendor-signed,
    in the manifest) grants it on this machine offline (None under a lease: the key server has it).
    The grant also checks that the license names this sealed file's signed header."""
    try:
        return check_license(License.parse(json.dumps(m["license"]).encode()), sealed, machine, guard).content_key
    except VaultError as e:
        raise BundleError(f"the sealed model in the update bundle is refused: {e}") from None


def check_model(bundle: Bundle, machine: MachineKey, guard: ClockGuard, copy: Path | None = None) -> bool:
    """Authenticate a model bundle's sealed model (the bundle's payload, or its `copy`) by every chunk's
    GCM tag. False when there is no key to do it with here (a lease, or format 1): then the signed
    chunk digests are to be checked instead."""
    if not self_authenticated(bundle):
        return False
    sealed = SealedFile(copy) if copy is not None else SealedFile(bundle.path, offset=bundle.payload_offset)
    key = content_key(sealed, bundle.manifest, machine, guard)
    if key is None:
        return False
    try:
        sealed.decrypt_to(key, lambda lo, out: None)
    except VaultError as e:
        raise BundleError(f"the sealed model in the update bundle is refused: {e}") from None
    return True


def check_early(bundle: Bundle) -> None:
    """Integrity first: a payload checked by its digests is checked before anything else, so that a
    damaged file says so whatever else is wrong with it."""
    if not self_authenticated(bundle):
        bundle.check_payload()


def check_contents(bundle: Bundle, machine: MachineKey, guard: ClockGuard) -> None:
    """The rest of `update verify`'s payload checks, after `check_early` and the store's own checks."""
    if self_authenticated(bundle) and not check_model(bundle, machine, guard):
        bundle.check_payload()
    if bundle.kind != "model":
        plain = open_payload(bundle.read_payload(), bundle.manifest["keys"], machine, payload_context(bundle.manifest))
        if bundle.kind == "adapter":
            check_gguf(plain, bundle.name)
        else:  # what apply refuses before it switches (a bad zip, an unsafe or repeated member), verify says
            sum(1 for _ in packs.members(plain))


def stage(bundle: Bundle, stage: Path, machine: MachineKey, guard: ClockGuard) -> None:
    """Copy the payload into the folder `stage`, fsynced, checked as `update verify` checks it: a sealed
    model as model.moat + model.lic, anything else as payload.sealed (opened once, so that a bad zip or
    a non-GGUF adapter is refused before anything switches)."""
    m = bundle.manifest
    if m["kind"] == "model":
        lic_doc = json.dumps(m["license"], indent=2) + "\n"
        (stage / "model.lic").write_text(lic_doc)
        if self_authenticated(bundle) and content_key(SealedFile(bundle.path, offset=bundle.payload_offset), m, machine, guard):

            def check_copy() -> None:  # every chunk of the copy authenticated, while it is fsynced
                if not check_model(bundle, machine, guard, stage / "model.moat"):
                    raise BundleError("the sealed model's license no longer grants its key")

            bundle.copy_raw(stage / "model.moat", meanwhile=check_copy)  # copied in the kernel
        else:  # format 1, or a lease (no key here): each chunk checked against its signed digest as it is copied
            bundle.copy_payload(stage / "model.moat")
            check_license(License.parse(lic_doc.encode()), SealedFile(stage / "model.moat"), machine, guard)
        return
    bundle.copy_payload(stage / "payload.sealed")
    blob = (stage / "payload.sealed").read_bytes()
    plain = open_payload(blob, m["keys"], machine, payload_context(m))
    if m["kind"] == "knowledge-pack":
        sum(1 for _ in packs.members(plain))  # a bad zip is refused before anything switches
    elif m["kind"] == "adapter":  # not at the next serve start, which `update:NAME` would stop
        check_gguf(plain, m["name"])
