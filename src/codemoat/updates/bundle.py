"""The update bundle (.moatpkg): a vendor-signed manifest, then the payload (docs/formats.md).

    magic "MOATPKG1" (8) | format version u16 | reserved u16 (0) | manifest length u32
    | manifest (canonical JSON) | Ed25519 signature (64) | payload (manifest.payload.size bytes)

The signature is the vendor's, over "codemoat-bundle-v1\\0" + the 16-byte prefix + the manifest,
so it binds every header field; the manifest names the payload's size and SHA-256, so the payload
is bound too, and the file must end exactly where the payload does. The payload is a sealed model
(.moat, fingerprinted for the customer, its license carried in the manifest) or, for adapters and
knowledge packs, a blob sealed to the customer's machines (vault.payload) whose associated data
is `payload_context(manifest)`: the bundle id, kind, name, version and customer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import CodemoatError
from ..vault.codec import VaultError, b64d, canonical, ed_public, key_id, sign, verify

MAGIC = b"MOATPKG1"
VERSION = 1
PREFIX = struct.Struct(">8sHHI")  # magic, version, reserved, manifest length
SIG_LEN = 64
MAX_MANIFEST = 4 << 20
DOMAIN = b"codemoat-bundle-v1"
KINDS = ("model", "adapter", "knowledge-pack")
FIELDS = {
    "bundle_id": str,
    "kind": str,
    "name": str,
    "version": str,
    "released_at": int,
    "min_codemoat": str,
    "rollback_target": bool,
    "notes": str,
    "customer": str,
    "customer_id": str,
    "vendor_key": str,
    "machines": list,
    "payload": dict,
}
_VERSION_RE = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9}){0,3}")  # ASCII digits only
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")  # a folder name in the update store: no "/", no ".."


class BundleError(VaultError):
    """A bundle was refused; the message says which check failed."""


def parse_version(text: str, what: str = "version") -> tuple[int, ...]:
    """'2.10.1' -> (2, 10, 1): one to four dot-separated numbers, compared numerically."""
    if not isinstance(text, str) or not _VERSION_RE.fullmatch(text):
        raise CodemoatError(f"{what} {text!r} is not a version such as 2 or 1.4.0 (numbers and dots)")
    parts = tuple(int(p) for p in text.split("."))
    return parts + (0,) * (4 - len(parts))


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise CodemoatError(f"bundle name {name!r} must be letters, digits, '.', '_' or '-' (at most 100)")
    return name


def channel(kind: str, name: str) -> str:
    """What anti-rollback and `rollback` count versions in: one model; each adapter and pack by name."""
    return "model" if kind == "model" else f"{kind}:{name}"


def payload_context(m: dict[str, Any]) -> bytes:
    return b"\x00".join(
        x.encode() for x in ("codemoat-bundle-payload-v1", m["bundle_id"], m["kind"], m["name"], m["version"], m["customer_id"])
    )


def _check_manifest(m: Any) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise BundleError("bundle manifest is not a JSON object")
    for name, typ in FIELDS.items():
        v = m.get(name)
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise BundleError(f"bundle manifest field {name!r} is missing or malformed")
    if not _ID_RE.fullmatch(m["bundle_id"]):
        raise BundleError("bundle manifest field 'bundle_id' is malformed")
    if m["kind"] not in KINDS:
        raise BundleError(f"bundle kind {m['kind']!r} is not one of {', '.join(KINDS)}")
    try:
        parse_version(m["version"], "bundle version")
        parse_version(m["min_codemoat"], "minimum codemoat version")
        check_name(m["name"])
    except CodemoatError as e:
        raise BundleError(str(e)) from None
    if m.get("replaces") is not None and not isinstance(m["replaces"], str):
        raise BundleError("bundle manifest field 'replaces' is malformed")
    p = m["payload"]
    if not (
        isinstance(p.get("size"), int)
        and not isinstance(p["size"], bool)
        and p["size"] >= 0
        and isinstance(p.get("sha256"), str)
        and len(p["sha256"]) == 64
        and p.get("format") in ("moat", "sealed")
    ):
        raise BundleError("bundle manifest field 'payload' is malformed")
    if not m["machines"] or not all(isinstance(x, str) for x in m["machines"]):
        raise BundleError("bundle manifest field 'machines' is malformed")
    if m["kind"] == "model" and (p["format"] != "moat" or not isinstance(m.get("license"), dict)):
        raise BundleError("a model bundle carries a sealed model (.moat) and its license")
    if m["kind"] != "model" and (p["format"] != "sealed" or not isinstance(m.get("keys"), dict)):
        raise BundleError(f"a {m['kind']} bundle carries a payload sealed to the customer's machines")
    base = m.get("base")  # adapters: the base model it was made for (older bundles have none: refused at install)
    if base is not None and not (
        m["kind"] == "adapter"
        and isinstance(base, dict)
        and isinstance(base.get("model_id"), str)
        and isinstance(base.get("sha256"), str)
        and re.fullmatch(r"[0-9a-f]{64}", base["sha256"])
    ):
        raise BundleError("bundle manifest field 'base' is malformed")
    return m


def write(out: str | Path, manifest: dict[str, Any], signing_key: Any, payload: Iterator[bytes]) -> Path:
    """Write a signed bundle: header, then the payload pieces (their size and digest already in `manifest`)."""
    out = Path(out)
    body = canonical(manifest)
    prefix = PREFIX.pack(MAGIC, VERSION, 0, len(body))
    signature = sign(signing_key, DOMAIN, prefix + body)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(prefix + body + signature)
            for piece in payload:
                f.write(piece)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CodemoatError(f"cannot write bundle {out}: {e.strerror}") from None
    return out


class Bundle:
    """An opened .moatpkg whose header signature and shape are checked; the payload is checked when read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise BundleError(f"bundle not found: {self.path}") from None
        except OSError as e:
            raise BundleError(f"cannot read bundle {self.path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(f"{self.path} is not a regular file, not an update bundle")
            head = os.pread(fd, PREFIX.size, 0)
            if len(head) < PREFIX.size:
                raise BundleError(f"{self.path.name} is not a codemoat update bundle (too short)")
            magic, version, reserved, mlen = PREFIX.unpack(head)
            if magic != MAGIC:
                raise BundleError(f"{self.path.name} is not a codemoat update bundle (bad magic)")
            if version != VERSION or reserved != 0:
                raise BundleError(f"update bundle format {version} is not supported (expected {VERSION})")
            if mlen > MAX_MANIFEST or PREFIX.size + mlen + SIG_LEN > st.st_size:
                raise BundleError("update bundle is truncated inside its header")
            raw = os.pread(fd, mlen + SIG_LEN, PREFIX.size)
        finally:
            os.close(fd)
        body, signature = raw[:mlen], raw[mlen:]
        try:
            fields = json.loads(body.decode("utf-8"))
            canon = canonical(fields)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise BundleError("update bundle manifest is not valid JSON") from None
        if not isinstance(fields, dict) or not isinstance(fields.get("vendor_key"), str):
            raise BundleError("update bundle manifest names no vendor key")
        verify(ed_public(fields["vendor_key"], "bundle vendor key"), signature, DOMAIN, head + body, "update bundle")
        if canon != body:
            raise BundleError("update bundle manifest is not in canonical form")
        self.manifest = _check_manifest(fields)
        self.header_sha256 = hashlib.sha256(head + body).hexdigest()
        self.payload_offset = PREFIX.size + mlen + SIG_LEN
        expect = self.payload_offset + fields["payload"]["size"]
        if st.st_size < expect:
            raise BundleError(f"update bundle is truncated: {st.st_size} bytes, expected {expect}")
        if st.st_size > expect:
            raise BundleError(f"update bundle has {st.st_size - expect} unexpected trailing bytes")

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["manifest"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def vendor_key_id(self) -> str:
        return key_id(b64d(self.manifest["vendor_key"]))

    @property
    def channel(self) -> str:
        return channel(self.manifest["kind"], self.manifest["name"])

    def pieces(self, block: int = 8 << 20) -> Iterator[bytes]:
        """The payload in blocks, as stored (not yet checked: `copy_payload` checks the digest)."""
        left = self.manifest["payload"]["size"]
        with open(self.path, "rb") as f:
            f.seek(self.payload_offset)
            while left > 0:
                b = f.read(min(block, left))
                if not b:
                    raise BundleError("update bundle payload is truncated")
                left -= len(b)
                yield b

    def check_payload(self, block: int = 8 << 20) -> None:
        """Hash the payload against the signed digest (read only). Two buffers read into in turn (no
        allocation per block) while a second thread hashes the other one (hashlib releases the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        h = hashlib.sha256()
        bufs = [bytearray(block), bytearray(block)]
        left = self.manifest["payload"]["size"]
        with open(self.path, "rb", buffering=0) as f, ThreadPoolExecutor(1) as pool:
            f.seek(self.payload_offset)
            pending, i = None, 0
            while left > 0:
                view = memoryview(bufs[i])[: min(block, left)]
                got = 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise BundleError("update bundle payload is truncated")
                    got += n
                if pending is not None:
                    pending.result()
                pending = pool.submit(h.update, view)
                left -= got
                i ^= 1
            if pending is not None:
                pending.result()
        self._compare(h.hexdigest())

    def copy_payload(self, dest: Path) -> None:
        """Copy the payload into `dest` (fsynced), hashing it on the way: one read of the bundle.

        The hash runs in a second thread on the block just written (hashlib releases the GIL on
        large buffers), so copying and hashing overlap."""
        from concurrent.futures import ThreadPoolExecutor

        h = hashlib.sha256()
        with open(dest, "wb") as out, ThreadPoolExecutor(1) as pool:
            pending = None
            for b in self.pieces():
                if pending is not None:
                    pending.result()
                pending = pool.submit(h.update, b)
                out.write(b)
            if pending is not None:
                pending.result()
            out.flush()
            os.fsync(out.fileno())
        self._compare(h.hexdigest())

    def read_payload(self) -> bytes:
        data = b"".join(self.pieces())
        self._compare(hashlib.sha256(data).hexdigest())
        return data

    def _compare(self, digest: str) -> None:
        if digest != self.manifest["payload"]["sha256"]:
            raise BundleError("update bundle payload does not match its signed digest (changed or damaged)")

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {
            k: m.get(k)
            for k in (
                "bundle_id",
                "kind",
                "name",
                "version",
                "released_at",
                "min_codemoat",
                "replaces",
                "rollback_target",
                "notes",
                "customer",
                "machines",
                "base",
            )
        } | {"payload_size": m["payload"]["size"], "vendor_key_id": self.vendor_key_id, "file": str(self.path)}
