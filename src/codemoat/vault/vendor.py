"""The vendor's store: signing keys, a master key, and a database of customers, sealed models and licenses.

    DIR/vendor.json     public facts (key ids, database URL)
    DIR/signing.key     Ed25519 key that signs manifests and licenses   (0600)
    DIR/keyserver.key   Ed25519 key that signs lease answers            (0600)
    DIR/master.key      AES-256 key for the secrets kept in the database (0600)
    DIR/vendor.db       SQLite (or `database_url` in vendor.json: PostgreSQL)

Content keys and customer secrets are stored encrypted under the master key, so a copy of the
database alone (a backup, a shared PostgreSQL) opens no model. Issuing, revoking and listing licenses is
`vault.vendor_licenses` (a mixin of `Vendor`).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.exc import IntegrityError

from .. import db, paths
from ..errors import CodemoatError, NotFound
from ..names import RULE, valid_name  # one rule for every name a person types
from .codec import VaultError, b64e, ed_private_raw, key_id, public_raw, write_secret
from .container import SealedFile
from .samefile import refuse_input_as_output
from .seal_model import Fingerprinter, check_model, model_inputs, seal_model
from .vendor_licenses import VendorLicenses
from .vendor_tables import customers_t, leases_t, licenses_t, models_t  # noqa: F401 (the tables are imported from here too)


def check_customer_name(name: str) -> str:
    """A new customer's name, by the rule user, group and token names follow (`codemoat.names`): ASCII letters,
    digits, '.', '_', '@', '-', at most 128. Any string was taken: a newline split `vendor license list`'s rows
    and every one-line error that names the customer, and 100,000 characters were signed into each license."""
    if not valid_name(name):
        shown = name if len(name) <= 60 else name[:60] + "..."
        raise CodemoatError(f"invalid customer name {shown!r} ({len(name)} characters): {RULE}")
    return name


@dataclass(frozen=True)
class Customer:
    name: str
    id: str
    fingerprint_secret: bytes
    watermark_secret: bytes
    created_at: int


class Vendor(VendorLicenses):
    """A vendor directory, opened: keys in memory, database migrated."""

    def __init__(self, root: Path, signing: Ed25519PrivateKey, keyserver: Ed25519PrivateKey, master: bytes, engine: sa.Engine):
        self.root, self.signing_key, self.keyserver_key, self._master, self.engine = root, signing, keyserver, master, engine

    # -- lifecycle --------------------------------------------------------
    @classmethod
    def init(cls, root: str | Path, database_url: str | None = None) -> Vendor:
        root = Path(root)
        if (root / "vendor.json").exists():
            raise CodemoatError(f"{root} already holds a vendor (vendor.json exists); refusing to overwrite its keys")
        if root.exists() and not root.is_dir():
            raise CodemoatError(f"{root} is a file: --vendor names a folder for the vendor's keys")
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise CodemoatError(f"cannot create vendor folder {root}: {e.strerror}") from None
        signing, ks = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        write_secret(root / "signing.key", ed_private_raw(signing))
        write_secret(root / "keyserver.key", ed_private_raw(ks))
        write_secret(root / "master.key", os.urandom(32))
        info = {
            "version": 1,
            "created_at": int(time.time()),
            "vendor_key": b64e(public_raw(signing.public_key())),
            "vendor_key_id": key_id(public_raw(signing.public_key())),
            "keyserver_key": b64e(public_raw(ks.public_key())),
            "keyserver_key_id": key_id(public_raw(ks.public_key())),
            "database_url": database_url,
        }
        (root / "vendor.json").write_text(json.dumps(info, indent=2) + "\n")
        return cls.open(root)

    @classmethod
    def open(cls, root: str | Path) -> Vendor:
        root = Path(root)
        for name in ("vendor.json", "signing.key", "keyserver.key", "master.key"):
            if not (root / name).exists():
                raise VaultError(f"no vendor keys in {root} ({name} is missing): run `codemoat vendor init --vendor DIR`")

        def read(name: str) -> bytes:  # a FIFO or device planted in the vendor folder is refused, not read for good
            return paths.read_regular(root / name, "vendor file", 1 << 20, VaultError)

        try:
            info = json.loads(read("vendor.json"))
            signing = Ed25519PrivateKey.from_private_bytes(read("signing.key"))
            ks = Ed25519PrivateKey.from_private_bytes(read("keyserver.key"))
            master = read("master.key")
        except (ValueError, OSError) as e:
            raise VaultError(f"vendor directory {root} is damaged: {e}") from None
        if len(master) != 32:
            raise VaultError(f"vendor master key in {root} is damaged")
        engine = db.make_engine(info.get("database_url") or f"sqlite:///{root / 'vendor.db'}")
        db.upgrade(engine, ("vault",))  # the vault's own Alembic branch (migrations/versions/)
        return cls(root, signing, ks, master, engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Vendor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def vendor_key_b64(self) -> str:
        return b64e(public_raw(self.signing_key.public_key()))

    @property
    def keyserver_key_b64(self) -> str:
        return b64e(public_raw(self.keyserver_key.public_key()))

    # -- secrets at rest --------------------------------------------------
    def _seal_secret(self, secret: bytes, aad: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + AESGCM(self._master).encrypt(nonce, secret, aad.encode())

    def _open_secret(self, blob: bytes, aad: str) -> bytes:
        try:
            return AESGCM(self._master).decrypt(blob[:12], blob[12:], aad.encode())
        except InvalidTag:
            raise VaultError(f"vendor secret {aad} cannot be decrypted with this vendor's master key") from None

    # -- customers --------------------------------------------------------
    def _customer(self, row: Any) -> Customer:
        return Customer(
            row.name,
            row.id,
            self._open_secret(row.fingerprint_secret, f"fingerprint:{row.id}"),
            self._open_secret(row.watermark_secret, f"watermark:{row.id}"),
            row.created_at,
        )

    def find_customer(self, name: str) -> Customer | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(customers_t).where(customers_t.c.name == name)).first()
        return self._customer(row) if row else None

    def customer(self, name: str) -> Customer:
        """The customer called `name`, created (with fresh secrets) on first use."""
        name = name.strip()
        if not name:
            raise CodemoatError("customer name is empty")
        found = self.find_customer(name)
        if found:
            return found
        check_customer_name(name)  # a new one only: a customer made before the rule still opens
        cid = "c_" + uuid.uuid4().hex[:16]
        try:
            with self.engine.begin() as c:
                c.execute(
                    customers_t.insert().values(
                        id=cid,
                        name=name,
                        created_at=int(time.time()),
                        fingerprint_secret=self._seal_secret(os.urandom(32), f"fingerprint:{cid}"),
                        watermark_secret=self._seal_secret(os.urandom(32), f"watermark:{cid}"),
                    )
                )
        except IntegrityError:  # created meanwhile by another process
            pass
        return self.find_customer(name)  # type: ignore[return-value]

    def customers(self) -> list[Customer]:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(customers_t).order_by(customers_t.c.name)).all()
        return [self._customer(r) for r in rows]

    def customer_by_id(self, cid: str) -> Customer:
        with self.engine.connect() as c:
            row = c.execute(sa.select(customers_t).where(customers_t.c.id == cid)).first()
        if row is None:
            raise NotFound(f"no customer with id {cid}")
        return self._customer(row)

    # -- sealing ----------------------------------------------------------
    def seal(
        self,
        model: str | Path,
        customer: str,
        out: str | Path,
        *,
        fingerprint: Fingerprinter | None = None,
        chunk_size: int | None = None,
    ) -> SealedFile:
        """Encrypt a model for `customer` (fingerprinted first when `fingerprint` is given) into `out`.
        A model that is not whole is refused before anything is written, the customer's row included."""
        model = Path(model)
        refuse_input_as_output(out, model_inputs(model), "model")
        check_model(model)
        cust = self.customer(customer)
        sealed, key, fmt = seal_model(
            model,
            out,
            signing_key=self.signing_key,
            customer=cust.name,
            customer_id=cust.id,
            fingerprint_secret=cust.fingerprint_secret,
            fingerprint=fingerprint,
            chunk_size=chunk_size,
        )
        return self._record(sealed, cust, key, model, fmt, fingerprint is not None)

    def _record(self, sealed: SealedFile, cust: Customer, key: bytes, model: Path, fmt: str, fingerprinted: bool) -> SealedFile:
        m = sealed.manifest
        with self.engine.begin() as c:
            c.execute(
                models_t.insert().values(
                    file_id=m.file_id,
                    customer_id=cust.id,
                    model_id=m.model_id,
                    format=fmt,
                    plaintext_size=m.plaintext_size,
                    plaintext_sha256=m.plaintext_sha256,
                    manifest_sha256=sealed.manifest_sha256,
                    content_key=self._seal_secret(key, f"content:{m.file_id}"),
                    fingerprinted=fingerprinted,
                    source=str(model.resolve()),
                    created_at=m.created,
                )
            )
        return sealed

    def originals(self) -> list[Path]:
        """Source paths of every model sealed with a fingerprint, most recent first (what `trace` compares to)."""
        with self.engine.connect() as c:
            rows = c.execute(
                sa.select(models_t.c.source).where(models_t.c.fingerprinted.is_(True)).order_by(models_t.c.created_at.desc())
            ).all()
        return list(dict.fromkeys(Path(src) for (src,) in rows if src))

    def content_key(self, file_id: str) -> bytes:
        with self.engine.connect() as c:
            row = c.execute(sa.select(models_t.c.content_key).where(models_t.c.file_id == file_id)).first()
        if row is None:
            raise VaultError(
                f"this vendor has no key for sealed file {file_id} (it was sealed by another vendor "
                "or with another vendor database)"
            )
        return self._open_secret(row.content_key, f"content:{file_id}")

    def open_sealed(self, moat: str | Path) -> tuple[SealedFile, bytes]:
        sealed = SealedFile(moat)
        if sealed.manifest.vendor_key != self.vendor_key_b64:
            raise VaultError(
                f"{Path(moat).name} was sealed by vendor {sealed.vendor_key_id}, not by this vendor "
                f"({key_id(public_raw(self.signing_key.public_key()))})"
            )
        return sealed, self.content_key(sealed.manifest.file_id)

    def unseal(self, moat: str | Path, out: str | Path, *, force: bool = False) -> Path:
        """Decrypt the vendor's own sealed file: a .gguf file, or a folder for safetensors. An existing
        file, or a folder that is not empty (its files would be mixed with the model's), only with `force`;
        never the sealed file itself (`samefile`)."""
        refuse_input_as_output(out, [moat], "sealed file")
        sealed, key = self.open_sealed(moat)
        out = Path(out)
        m = sealed.manifest
        if m.format != "gguf":  # a folder: none of the files written into it may be the sealed file either
            for p in m.parts:
                refuse_input_as_output(out / Path(p["name"]).name, [moat], "sealed file")
        if m.format == "gguf" and out.is_dir():
            raise CodemoatError(f"{out} is a folder: name the .gguf file to write")
        if m.format != "gguf" and out.exists() and not out.is_dir():
            raise CodemoatError(f"{out} is a file: a safetensors model unseals into a folder")
        if not force:
            if m.format == "gguf" and (out.exists() or out.is_symlink()):
                raise CodemoatError(f"{out} exists: pass --force to replace it")
            if m.format != "gguf" and out.is_dir() and any(out.iterdir()):
                raise CodemoatError(f"{out} is a folder that is not empty: pass --force to write the model's files into it")
        plain = sealed.decrypt(key, check_sha256=True)
        try:  # written as new files (or replaced with force): a file or link put there during the decryption is
            # refused, never truncated or written through (paths.write_out)
            if m.format == "gguf":
                out.parent.mkdir(parents=True, exist_ok=True)
                paths.write_out(out, plain, force=force)
            else:
                out.mkdir(parents=True, exist_ok=True)
                for p in m.parts:
                    name = Path(p["name"]).name
                    paths.write_out(out / name, memoryview(plain)[p["offset"] : p["offset"] + p["size"]], force=force)
        except FileExistsError as e:
            raise CodemoatError(f"{e.filename or out} exists: pass --force to replace it") from None
        except OSError as e:
            raise CodemoatError(f"cannot write {e.filename or out}: {e.strerror}") from None
        return out
