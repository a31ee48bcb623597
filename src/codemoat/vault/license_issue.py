"""Issuing a license (`vault.license`): the vendor builds its body, wraps an offline license's keys to the
machine (its TPM's P-256 unwrap key when it has one, else its X25519 key) and signs it. What a license holds,
and how a machine checks it, is `vault.license`'s."""

from __future__ import annotations

import uuid
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .codec import VaultError, b64e, canonical, public_raw, sign, wrap, x_public
from .container import SealedFile, content_key_id
from .license import DOMAIN, FEATURES, KIND, MODES, VERSION, key_context
from .machine import POLICIES, check_facts, check_tpm_block
from .snpbind import check_snp_block
from .tpmwrap import wrap_p256_shared


def issue(
    signing_key: Ed25519PrivateKey,
    *,
    sealed: SealedFile,
    customer: str,
    customer_id: str,
    machines: list[dict[str, Any]],
    content_key: bytes,
    watermark_key: bytes | None,
    not_before: int,
    expires: int,
    issued_at: int,
    features: list[str],
    mode: str = "offline",
    policy: str = "most",
    lease: dict[str, Any] | None = None,
    license_id: str | None = None,
    support_until: int | None = None,
    allow_no_facts: bool = False,
) -> dict[str, Any]:
    """A signed license document (the JSON object written to the .lic file).

    `support_until`: the end of the support contract (updates released after it do not install);
    omitted from the body when None, so a license without one signs exactly as before."""
    if mode not in MODES:
        raise VaultError(f"license mode must be one of {', '.join(MODES)}")
    if policy not in POLICIES:
        raise VaultError(f"match policy must be one of {', '.join(POLICIES)}")
    bad = [f for f in features if f not in FEATURES]
    if bad:
        raise VaultError(f"unknown feature(s) {', '.join(bad)}; known: {', '.join(FEATURES)}")
    if expires <= not_before:
        raise VaultError("license expiry must come after its start")
    if content_key_id(content_key) != sealed.manifest.key_id:
        raise VaultError("content key does not belong to this sealed file")
    if not machines:
        raise VaultError("a license names at least one machine")
    lid = license_id or "lic_" + uuid.uuid4().hex[:20]
    m = sealed.manifest
    body: dict[str, Any] = {
        "id": lid,
        "issued_at": issued_at,
        "not_before": not_before,
        "expires": expires,
        "vendor_key": b64e(public_raw(signing_key.public_key())),
        "customer": customer,
        "customer_id": customer_id,
        "model": {
            "file_id": m.file_id,
            "manifest_sha256": sealed.manifest_sha256,
            "key_id": m.key_id,
            "model_id": m.model_id,
            "format": m.format,
        },
        "machines": [_entry(x, mode, allow_no_facts) for x in machines],
        "match_policy": policy,
        "features": list(features),
        "mode": mode,
        "watermark": watermark_key is not None,
        "keys": None,
        "lease": None,
    }
    if support_until is not None:
        body["support_until"] = int(support_until)
    if mode == "offline":
        if len(machines) != 1:
            raise VaultError("an offline license is bound to exactly one machine")
        body["keys"] = wrap_keys(body["machines"][0], lid, content_key, watermark_key)
    else:
        if not lease:
            raise VaultError("a lease license needs a key server (--keyserver)")
        if lease["seats"] < 1:
            raise VaultError("seats must be at least 1")
        body["lease"] = dict(lease)
    signature = sign(signing_key, DOMAIN, canonical(body))
    return {"kind": KIND, "version": VERSION, "license": body, "signature": b64e(signature)}


def _entry(x: dict[str, Any], mode: str, allow_no_facts: bool) -> dict[str, Any]:
    """A license's machine entry: the software keys always, and the TPM block when the machine has one;
    its hardware facts checked whichever way the identity came (`machine.check_facts`). An SEV-SNP block binds
    only a lease (the key server checks its report); an offline license is bound by its facts alone."""
    chip_bound = bool(x.get("tpm") or (x.get("snp") and mode == "lease"))
    check_facts(x.get("facts"), chip_bound=chip_bound, allow_none=allow_no_facts)
    e = {"id": x["id"], "x25519": x["x25519"], "ed25519": x["ed25519"], "facts": x["facts"], "binding": "software"}
    if x.get("tpm"):
        if x["tpm"].get("crl") is None:  # made by an older codemoat: a deleted CRL counter would go unseen (vault.crl)
            raise VaultError(
                f"machine {x['id']}'s TPM identity names no CRL counter (made by an older codemoat): run "
                "`codemoat machine-id --tpm` again on the machine and send its output"
            )
        e.update(binding="tpm", tpm=check_tpm_block(x["tpm"]))
    if x.get("snp"):  # an SEV-SNP guest: leases need its attestation report (vault.snpbind)
        e["snp"] = check_snp_block(x["snp"])
    return e


def wrap_keys(entry: dict[str, Any], lid: str, content_key: bytes, watermark_key: bytes | None) -> dict[str, Any]:
    """An offline license's keys, wrapped to the machine's TPM unwrap key when it has one (both to one ephemeral
    point: a start's one TPM2_ECDH_ZGen opens both, `tpmwrap.wrap_p256_shared`), else to its X25519 key."""
    items = [(content_key, key_context("content-key", lid))]
    if watermark_key:
        items.append((watermark_key, key_context("watermark-key", lid)))
    if entry.get("binding") == "tpm":
        wrapped = wrap_p256_shared(entry["tpm"]["unwrap"], items)
    else:
        rcpt = x_public(entry["x25519"], "machine x25519 key")
        wrapped = [wrap(rcpt, secret, ctx) for secret, ctx in items]
    return {"content_key": wrapped[0], "watermark_key": wrapped[1] if watermark_key else None}
