"""What the update store checks before it installs a bundle, every check but the payload's digest:
the support license (this machine's, from a trusted vendor, not expired by the authenticated clock),
the bundle against it (vendor, customer, machines, codemoat version, support window), the version
order (a downgrade only to a bundle the vendor signed as a rollback target), the license inside a
model bundle, and an adapter's base model against the models this machine serves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import CodemoatError
from ..vault.clock import iso
from ..vault.codec import b64e
from ..vault.license import License, check_trusted_vendor
from . import packs
from .bundle import Bundle, BundleError, label, parse_version


def support_end(body: dict[str, Any]) -> int:
    """When the license's support window ends; a license without `support_until` (issued before
    support contracts existed) is supported until it expires."""
    su = body.get("support_until")
    return int(su) if su is not None else int(body["expires"])


class BundleChecks:
    """Mixed into `store.UpdateStore`: reads its `machine`, `guard`, `models`, `license_path`, `current()` and `state()`."""

    # -- the support license ---------------------------------------------------------------------
    def _license(self, given: Path | bytes | None) -> tuple[License, bool]:
        if isinstance(given, bytes):  # the file's bytes, read once: what is checked is what apply records
            return License.parse(given), True
        if given is not None:
            return License.load(given), True
        if not self.license_path.exists():
            raise CodemoatError("no license recorded for updates: pass --license FILE (your current license)")
        return License.load(self.license_path), False

    def _check_license(self, lic: License) -> float:
        b = lic.body
        check_trusted_vendor(b["vendor_key"])
        entry = next((x for x in b["machines"] if x["id"] == self.machine.id), None)
        if entry is None or entry.get("x25519") != b64e(self.machine.x25519_public):
            raise CodemoatError(f"license {b['id']} is for another machine; this machine is {self.machine.id}")
        now = self.guard.check()
        if now >= b["expires"]:
            raise CodemoatError(f"license {b['id']} expired on {iso(b['expires'])}")
        return now

    # -- checks ----------------------------------------------------------------------------------
    def check(self, bundle: Bundle, license_file: Path | bytes | None = None) -> dict[str, Any]:
        """Every check but the payload's digest; the first failure raises (one line)."""
        m = bundle.manifest
        lic, _ = self._license(license_file)
        b = lic.body
        if b["vendor_key"] != m["vendor_key"]:
            raise BundleError(f"bundle is signed by vendor {bundle.vendor_key_id}, the license by {lic.vendor_key_id}")
        now = self._check_license(lic)
        if m["customer_id"] != b["customer_id"]:
            raise BundleError(f"bundle is for customer {m['customer']!r}, this license is for {b['customer']!r}")
        if self.machine.id not in m["machines"]:
            raise BundleError(f"bundle is for other machines ({', '.join(m['machines'][:3])}); this machine is {self.machine.id}")
        if parse_version(m["min_codemoat"]) > parse_version(__version__):
            raise BundleError(f"bundle needs codemoat {m['min_codemoat']} or newer; this is {__version__}")
        end = support_end(b)
        if m["released_at"] > end:
            raise BundleError(
                f"{label(m)} was released on {iso(m['released_at'])}, after "
                f"your support ended on {iso(end)}: renew support (a renewed license unlocks it)"
            )
        cur = self.current(bundle.channel)
        if cur is not None:
            if cur["bundle_id"] == m["bundle_id"] or cur["version"] == m["version"]:
                raise BundleError(f"{bundle.channel} {m['version']} is already installed")
            newer = parse_version(m["version"]) > parse_version(cur["version"])
            if not newer and not m["rollback_target"]:
                raise BundleError(
                    f"{bundle.channel} {m['version']} is not newer than the installed {cur['version']}: "
                    "a downgrade needs a bundle the vendor signed as a rollback target"
                )
            kept = self.state()["channels"].get(bundle.channel, {}).get("history") or []
            if m["bundle_id"] in kept:  # its folder is in the store, for `update rollback`: installing it again cannot
                raise BundleError(
                    f"{bundle.channel} {m['version']} is still kept here from an earlier install: "
                    "`codemoat update rollback` goes back to it (one version a step)"
                )
        if m["kind"] == "adapter":
            self._check_base(m)
        if m["kind"] == "knowledge-pack":
            packs.check_free(m["name"])
        if m["kind"] == "model":
            inner = License.parse(json.dumps(m["license"]).encode())
            if inner.body["vendor_key"] != m["vendor_key"] or inner.body["customer_id"] != m["customer_id"]:
                raise BundleError("the license inside the bundle is for another vendor or customer")
            if not any(x["id"] == self.machine.id for x in inner.body["machines"]):
                raise BundleError("the license inside the bundle is for another machine")
        return {
            "bundle": bundle.describe(),
            "license": b["id"],
            "support_until": iso(end),
            "checked_at": iso(now),
            "installed": cur["version"] if cur else None,
        }

    def installed_models(self) -> dict[str, str]:
        """{plaintext SHA-256: what it is} of the models this machine serves: the installed model bundle
        and `self.models` (a sealed file's digest is read from its signed manifest, a plain file is hashed)."""
        from ..vault.container import SealedFile

        files = list(self.models)
        cur = self.current("model")
        if cur is not None:
            files.append(Path(cur["dir"]) / "model.moat")
        out: dict[str, str] = {}
        for f in files:
            f = Path(f).expanduser()
            if f.suffix == ".moat" and f.is_file():
                m = SealedFile(f).manifest
                out[m.plaintext_sha256] = f"{m.model_id} ({f.name})"
            elif f.is_file():
                h = hashlib.sha256()
                with open(f, "rb") as fh:
                    while b := fh.read(8 << 20):
                        h.update(b)
                out[h.hexdigest()] = f.name
        return out

    def _check_base(self, m: dict[str, Any]) -> None:
        base = m.get("base")
        if base is None:
            raise BundleError(
                f"{label(m)} names no base model (released before bundles named one): ask the vendor to release it again"
            )
        have = self.installed_models()
        if not have:
            raise BundleError(
                f"{label(m)} is for base model {base['model_id']}, and no model is installed here to check it against "
                "(apply the model bundle first, or set model.path)"
            )
        if base["sha256"] not in have:
            mine = ", ".join(f"{v} {k[:12]}" for k, v in have.items())
            raise BundleError(
                f"{label(m)} is for base model {base['model_id']} {base['sha256'][:12]}, not the installed model {mine}"
            )
