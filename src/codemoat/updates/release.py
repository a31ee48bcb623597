"""The vendor's side: `vendor release` turns a model, adapter or knowledge pack into a signed bundle.

A bundle is bound to the machines of the customer's most recent (unrevoked) license. A model is
sealed exactly as `vendor seal` seals it (Vendor.seal: the customer's fingerprint, a fresh content
key) and a new license for it is issued with the terms of that latest license (dates, support
window, mode, features), carried in the manifest. Adapters and knowledge packs are sealed to the
machines' keys (vault.payload); a GGUF adapter is first fingerprinted for the customer as `vendor seal`
fingerprints one (when `fingerprint` is given, as the CLI does by default); an adapter's manifest names its base model (`base`: model id and
plaintext SHA-256, by default of the model the customer's license is for). Releases are remembered in DIR/releases.jsonl, which gives the
default `replaces` (the version this one follows).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .. import __version__
from ..errors import CodemoatError, NotFound
from ..paths import open_regular, read_regular
from ..vault.payload import seal_payload
from ..vault.vendor import Vendor, licenses_t
from ..vault.vendor_tables import models_t
from . import bundle as fmt

RELEASES = "releases.jsonl"


def latest_license(vendor: Vendor, customer_id: str, license_id: str | None = None) -> dict[str, Any]:
    """The customer's license `license_id`, or its most recently issued unrevoked one."""
    q = (
        sa.select(licenses_t.c.document)
        .where(licenses_t.c.customer_id == customer_id)
        .where(licenses_t.c.revoked_at.is_(None))
        .order_by(licenses_t.c.issued_at.desc())
    )
    if license_id is not None:
        q = q.where(licenses_t.c.id == license_id)
    with vendor.engine.connect() as c:
        row = c.execute(q).first()
    if row is None and license_id is not None:
        raise NotFound(f"no unrevoked license {license_id} for this customer")
    if row is None:
        raise NotFound("this customer has no license: issue one first (a bundle is bound to its license's machines)")
    return json.loads(row.document)


def pack_folder(folder: Path) -> bytes:
    """A knowledge pack from a folder: its regular files (no links), in a deterministic zip."""
    buf = io.BytesIO()
    n = 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_symlink() or not p.is_file() or "__pycache__" in p.parts:
                continue
            info = zipfile.ZipInfo(p.relative_to(folder).as_posix(), date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, read_regular(p, "knowledge pack file", None))
            n += 1
    if not n:
        raise CodemoatError(f"knowledge pack folder {folder} holds no files")
    return buf.getvalue()


def base_of(vendor: Vendor, lic: dict[str, Any], base_model: Path | None) -> dict[str, str]:
    """The base model an adapter is released for: `base_model` (the customer's sealed copy, or a plain
    file), else the model of the license the bundle is bound to; named by its plaintext SHA-256 (the
    customer's fingerprinted copy, which is what the customer serves)."""
    if base_model is not None:
        base_model = Path(base_model)
        if not base_model.exists():
            raise NotFound(f"base model not found: {base_model}")
        if base_model.suffix == ".moat":
            from ..vault.container import SealedFile

            m = SealedFile(base_model).manifest
            return {"model_id": m.model_id, "sha256": m.plaintext_sha256}
        h = hashlib.sha256()
        with os.fdopen(open_regular(base_model, "base model")[0], "rb") as f:
            while b := f.read(8 << 20):
                h.update(b)
        return {"model_id": base_model.name.split(".")[0], "sha256": h.hexdigest()}
    with vendor.engine.connect() as c:
        row = c.execute(
            sa.select(models_t.c.model_id, models_t.c.plaintext_sha256).where(models_t.c.file_id == lic["model"]["file_id"])
        ).first()
    if row is None or not row.plaintext_sha256:
        raise NotFound("the customer's license names a model this vendor did not seal: give --base-model FILE")
    return {"model_id": row.model_id, "sha256": row.plaintext_sha256}


def _previous(root: Path, customer_id: str, chan: str) -> str | None:
    try:
        lines = (root / RELEASES).read_text().splitlines()
    except FileNotFoundError:
        return None
    found = None
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("customer_id") == customer_id and r.get("channel") == chan:
            found = r.get("version")
    return found


def release(
    vendor: Vendor,
    *,
    customer: str,
    kind: str,
    source: Path,
    version: str,
    out: Path,
    name: str | None = None,
    notes: str = "",
    replaces: str | None = None,
    rollback_target: bool = False,
    min_codemoat: str | None = None,
    released_at: int | None = None,
    fingerprint: Any = None,
    license_id: str | None = None,
    base_model: Path | None = None,
) -> dict[str, Any]:
    """Build and sign one bundle for the machines (and, for a model, the terms) of `license_id`
    (default: the customer's latest license); returns its manifest."""
    if kind not in fmt.KINDS:
        raise CodemoatError(f"bundle kind must be one of {', '.join(fmt.KINDS)}")
    if base_model is not None and kind != "adapter":
        raise CodemoatError("--base-model names the model an adapter is for: give it with --adapter only")
    fmt.parse_version(version, "--version")
    min_codemoat = min_codemoat or __version__
    fmt.parse_version(min_codemoat, "minimum codemoat version")
    source = Path(source)
    if not source.exists():
        raise NotFound(f"{kind} not found: {source}")
    from ..vault.samefile import refuse_input_as_output
    from ..vault.seal_model import model_inputs

    # --out naming what the bundle is made of replaced it by the bundle: the model (each file of a safetensors
    # folder), the adapter, the base model an adapter names, a file inside a knowledge pack's folder
    inputs = [source, *(model_inputs(source) if kind == "model" else []), *([base_model] if base_model else [])]
    refuse_input_as_output(out, inputs, kind)
    if source.is_dir() and Path(out).resolve().is_relative_to(source.resolve()):
        raise CodemoatError(f"{out} is inside the {kind} folder {source}: write the bundle somewhere else")
    if kind == "model" and source.suffix == ".gguf":  # as `vendor seal` does: a GGUF that is not whole is not shipped
        from ..vault.seal_model import check_gguf

        check_gguf(source)
    elif kind == "adapter" and not source.is_dir():  # random bytes or a whole base model were shipped as a LoRA
        from ..vault.seal_model import check_lora_adapter

        check_lora_adapter(source)
    cust = vendor.find_customer(customer)
    if cust is None:
        raise NotFound(f"no customer named {customer!r} (customers are created by `vendor seal`)")
    lic = latest_license(vendor, cust.id, license_id)["license"]
    machines = lic["machines"]
    if name is None:
        name = source.stem if kind != "model" else "model"
    fmt.check_name(name)
    chan = fmt.channel(kind, name)
    if replaces is None:
        replaces = _previous(vendor.root, cust.id, chan)
    now = int(time.time()) if released_at is None else int(released_at)
    manifest: dict[str, Any] = {
        "bundle_id": "b_" + uuid.uuid4().hex[:24],
        "kind": kind,
        "name": name,
        "version": version,
        "released_at": now,
        "min_codemoat": min_codemoat,
        "replaces": replaces,
        "rollback_target": rollback_target,
        "notes": notes,
        "customer": cust.name,
        "customer_id": cust.id,
        "vendor_key": vendor.vendor_key_b64,
        "machines": [m["id"] for m in machines],
    }
    out = Path(out)
    tmp_moat = out.with_name(f".{out.name}.moat.partial")
    try:
        if kind == "model":
            vendor.seal(source, cust.name, tmp_moat, fingerprint=fingerprint)
            lease = lic.get("lease")
            doc = vendor.issue_license(
                customer=cust.name,
                model=tmp_moat,
                machines=machines,
                expires=lic["expires"],
                not_before=lic["not_before"],
                features=lic["features"],
                mode=lic["mode"],
                keyserver=lease["url"] if lease else None,
                lease_ttl=lease["ttl"] if lease else 3600,
                grace=lease["grace"] if lease else 900,
                seats=lease["seats"] if lease else 1,
                watermark=lic["watermark"],
                allow_no_facts=True,  # the machines of a license already issued: checked when it was
                policy=lic["match_policy"],
                support_until=lic.get("support_until"),
            )
            with open(tmp_moat, "rb") as f:
                payload = fmt.describe_payload("moat", fmt.file_reader(f.fileno()), os.fstat(f.fileno()).st_size)
            manifest.update(license=doc, keys=None, payload=payload)

            def pieces():
                with open(tmp_moat, "rb") as f:
                    while b := f.read(8 << 20):
                        yield b
        else:
            if kind == "knowledge-pack":
                data = pack_folder(source) if source.is_dir() else read_regular(source, "knowledge pack", None)
                _check_zip(data)
            else:
                if source.is_dir():
                    raise CodemoatError(f"an adapter is one file (.gguf or .safetensors): {source}")
                data = (
                    _fingerprinted(vendor, cust.name, source, tmp_moat, fingerprint)
                    if fingerprint is not None and source.suffix == ".gguf"
                    else read_regular(source, "adapter", None)
                )
                manifest["base"] = base_of(vendor, lic, base_model)
            manifest.update(license=None)
            blob, keys = seal_payload(data, machines, fmt.payload_context(manifest))
            src = memoryview(blob)

            def read_at(lo: int, part: memoryview) -> None:
                part[:] = src[lo : lo + len(part)]

            manifest.update(keys=keys, payload=fmt.describe_payload("sealed", read_at, len(blob)))

            def pieces():
                yield blob

        fmt.write(out, manifest, vendor.signing_key, pieces())
    finally:
        tmp_moat.unlink(missing_ok=True)
    with open(vendor.root / RELEASES, "a") as f:
        f.write(
            json.dumps(
                {
                    "bundle_id": manifest["bundle_id"],
                    "customer_id": cust.id,
                    "channel": chan,
                    "version": version,
                    "released_at": now,
                    "file": str(out),
                }
            )
            + "\n"
        )
        f.flush()
        os.fsync(f.fileno())
    return manifest


def _fingerprinted(vendor: Vendor, customer: str, source: Path, tmp: Path, fingerprint: Any) -> bytes:
    """A GGUF adapter marked with the customer's fingerprint exactly as `vendor seal` marks one (its
    lora_a weights), and recorded like it, so `trace` of a leaked copy names the customer."""
    sealed = vendor.seal(source, customer, tmp, fingerprint=fingerprint)
    return bytes(sealed.decrypt(vendor.content_key(sealed.manifest.file_id), check_sha256=True))


def _check_zip(data: bytes) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            z.infolist()
    except zipfile.BadZipFile:
        raise CodemoatError("a knowledge pack is a folder or a .zip file") from None
    from .packs import members

    for _ in members(data):  # what every customer's apply would refuse (an unsafe or repeated name), refused here
        pass
