"""Re-provisioning a TPM-bound license after a tamper event: the same chip, new PCR policy values.

After `codemoat appliance tamper-event` the chip's tamper PCR holds a new value, so neither the
offline unwrap nor an attested lease works. Once the vendor has dealt with the event, the customer
sends a fresh `codemoat machine-id --tpm`; `reprovision` re-signs the license (same id, same
terms) with that machine's new policy and unwrap key, after checking the attestation key is the
one registered (the same chip: a different one needs a new license, not a reprovision). An
offline license gets its keys wrapped again; the key server reads the new document for leases.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..errors import NotFound
from .codec import VaultError, b64e, canonical, sign
from .license import DOMAIN
from .license_issue import _entry, wrap_keys
from .vendor import Vendor, licenses_t


def reprovision(vendor: Vendor, license_id: str, identity: dict[str, Any]) -> dict[str, Any]:
    """The license re-signed with `identity`'s new TPM policy; recorded in the vendor database."""
    row = vendor.license_row(license_id)
    if row is None:
        raise NotFound(f"no license {license_id}")
    if row.revoked_at:
        raise VaultError(f"license {license_id} is revoked: issue a new one")
    doc = json.loads(row.document)
    body = dict(doc["license"])
    idx = next((i for i, m in enumerate(body["machines"]) if m["id"] == identity["id"]), None)
    if idx is None:
        raise VaultError(f"license {license_id} does not name machine {identity['id']}")
    old = body["machines"][idx]
    if old.get("binding") != "tpm":
        raise VaultError(f"license {license_id} binds machine {identity['id']} to software keys: nothing to reprovision")
    if not identity.get("tpm"):
        raise VaultError("the machine identity has no TPM block (run `codemoat machine-id --tpm` on the machine)")
    if identity["tpm"]["ak"] != old["tpm"]["ak"]:
        raise VaultError(
            "the identity's TPM attestation key is not the one registered for this license "
            "(another chip): issue a new license instead"
        )
    new = _entry(identity, body["mode"], allow_no_facts=False)  # TPM-bound (checked above): facts may be none
    from .tpmbind import require_bound

    require_bound(vendor.engine, new)  # the new unwrap key certified by the bound AK
    machines = list(body["machines"])
    machines[idx] = new
    body.update(machines=machines, issued_at=max(int(time.time()), body["issued_at"]))
    if body["mode"] == "offline":
        wm = vendor.customer_by_id(row.customer_id).watermark_secret if body.get("watermark") else None
        body["keys"] = wrap_keys(new, license_id, vendor.content_key(row.file_id), wm)
    out = dict(doc, license=body, signature=b64e(sign(vendor.signing_key, DOMAIN, canonical(body))))
    with vendor.engine.begin() as c:
        c.execute(licenses_t.update().where(licenses_t.c.id == license_id).values(document=json.dumps(out)))
    return out
