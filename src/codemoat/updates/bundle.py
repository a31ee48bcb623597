"""The update bundle (.moatpkg): a vendor-signed manifest, then the payload (docs/formats.md).

    magic "MOATPKG1" (8) | format version u16 | reserved u16 (0) | manifest length u32
    | manifest (canonical JSON) | Ed25519 signature (64) | payload (manifest.payload.size bytes)

The manifest's `pad` (spaces) starts the payload at a multiple of 4096 bytes, so that apply's kernel
copy of it is page to page; a bundle without it still reads.

The signature is the vendor's, over "codemoat-bundle-v1\\0" + the 16-byte prefix + the manifest,
so it binds every header field; the manifest names the payload's size and (format 2) the SHA-256
of each of its chunks of `payload.chunk_size` bytes, in order, so the payload is bound too, chunk
by chunk, and the file must end exactly where the payload does. Chunks are independent: verify
and apply check them on all usable cores at once (hashlib releases the GIL), and apply writes a
chunk only once it has checked out. Format 1 (one SHA-256 of the whole payload) is still read,
hashed in one pass. The payload is a sealed model (.moat, fingerprinted for the customer, its
license carried in the manifest) or, for adapters and knowledge packs, a blob sealed to the
customer's machines (vault.payload) whose associated data is `payload_context(manifest)`: the
bundle id, kind, name, version and customer.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import CodemoatError
from ..vault.codec import VaultError, b64d, canonical, ed_public, key_id, sign, verify
from ..vault.signedfile import SIG_LEN, read_header
from .chunks import CHUNK, describe_payload  # noqa: F401  (release.py and tests use them as bundle.*)
from .chunks import chunk_count, each_chunk, pwrite_all

MAGIC = b"MOATPKG1"
FORMAT_VERSION = 2  # what `write` makes: per-chunk digests
READS = (1, 2)  # 1: one SHA-256 of the whole payload (bundles made before chunk digests)
PREFIX = struct.Struct(">8sHHI")  # magic, format version, reserved, manifest length
MAX_MANIFEST = 4 << 20
PAGE = 4096  # `write` starts the payload at a multiple of this (the manifest's `pad`)
LEGACY_BLOCK = 8 << 20  # format 1: read and hashed in this order, one block at a time
GGUF_MAGIC = b"GGUF"
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
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")  # a folder name in the update store: no "/", no ".."


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


def label(m: dict[str, Any]) -> str:
    """'model 2', 'adapter lora 1.1', 'knowledge-pack httpx 0.28'."""
    return f"model {m['version']}" if m["kind"] == "model" else f"{m['kind']} {m['name']} {m['version']}"


def check_gguf(data: bytes, name: str) -> None:
    """An adapter bundle's plaintext is a GGUF LoRA adapter (checked at verify, apply and serve)."""
    if data[:4] != GGUF_MAGIC:
        raise CodemoatError(f"adapter {name!r} is not a GGUF LoRA adapter (llama.cpp serves GGUF adapters only)")


def payload_context(m: dict[str, Any]) -> bytes:
    return b"\x00".join(
        x.encode() for x in ("codemoat-bundle-payload-v1", m["bundle_id"], m["kind"], m["name"], m["version"], m["customer_id"])
    )


def _check_manifest(m: Any, format_version: int) -> dict[str, Any]:
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
    _check_payload_fields(p, format_version)
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


def _check_payload_fields(p: dict[str, Any], format_version: int) -> None:
    ok = (
        isinstance(p.get("size"), int)
        and not isinstance(p["size"], bool)
        and p["size"] >= 0
        and p.get("format") in ("moat", "sealed")
    )
    if ok and format_version == 1:
        ok = isinstance(p.get("sha256"), str) and len(p["sha256"]) == 64
    elif ok:
        cs, chunks = p.get("chunk_size"), p.get("chunks")
        ok = (
            isinstance(cs, int)
            and not isinstance(cs, bool)
            and 4096 <= cs <= 1 << 30
            and isinstance(chunks, list)
            and all(isinstance(d, str) and _DIGEST_RE.fullmatch(d) for d in chunks)
        )
        if ok and len(chunks) != chunk_count(p["size"], cs):
            raise BundleError(
                f"bundle manifest lists {len(chunks)} payload chunks, but {p['size']} bytes in chunks of {cs} "
                f"make {chunk_count(p['size'], cs)}"
            )
    if not ok:
        raise BundleError("bundle manifest field 'payload' is malformed")


def aligned(manifest: dict[str, Any]) -> bytes:
    """The canonical manifest with a `pad` of spaces that makes the payload start on a page boundary
    (PREFIX + manifest + signature a multiple of PAGE): apply's kernel copy of a sealed model then
    copies page to page (from an unaligned offset it measured 1.2-1.35x slower, bench/results/updates.md)."""
    m = dict(manifest, pad="")
    m["pad"] = " " * (-(PREFIX.size + len(canonical(m)) + SIG_LEN) % PAGE)
    return canonical(m)


def write(
    out: str | Path,
    manifest: dict[str, Any],
    signing_key: Any,
    payload: Iterable[bytes],
    format_version: int = FORMAT_VERSION,
    align: bool = True,
) -> Path:
    """Write a signed bundle: header, then the payload pieces (their size and digests already in
    `manifest`, as `describe_payload` gives them; `format_version` 1 and `align=False`, the payload
    wherever the manifest ends, only to test and bench bundles made before)."""
    out = Path(out)
    body = aligned(manifest) if align else canonical({k: v for k, v in manifest.items() if k != "pad"})
    prefix = PREFIX.pack(MAGIC, format_version, 0, len(body))
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
        h = read_header(
            self.path,
            prefix=PREFIX,
            magic=MAGIC,
            versions=READS,
            max_manifest=MAX_MANIFEST,
            what="update bundle",
            error=BundleError,
        )
        if h.prefix[2] != 0:
            raise BundleError(f"update bundle reserved field is {h.prefix[2]}, not 0")
        fields = h.fields
        if not isinstance(fields.get("vendor_key"), str):
            raise BundleError("update bundle manifest names no vendor key")
        verify(ed_public(fields["vendor_key"], "bundle vendor key"), h.signature, DOMAIN, h.signed, "update bundle")
        self.format_version = h.prefix[1]  # the layout (1 or 2); the release's version is the manifest's
        self.manifest = _check_manifest(fields, self.format_version)
        self.header_sha256 = hashlib.sha256(h.signed).hexdigest()
        self.payload_offset = h.payload_offset
        expect = self.payload_offset + fields["payload"]["size"]
        if h.file_size < expect:
            raise BundleError(f"update bundle is truncated: {h.file_size} bytes, expected {expect}")
        if h.file_size > expect:
            raise BundleError(f"update bundle has {h.file_size - expect} unexpected trailing bytes")

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
        """The payload in blocks, as stored (not checked)."""
        left = self.manifest["payload"]["size"]
        with open(self.path, "rb") as f:
            f.seek(self.payload_offset)
            while left > 0:
                b = f.read(min(block, left))
                if not b:
                    raise BundleError("update bundle payload is truncated")
                left -= len(b)
                yield b

    def check_payload(self) -> None:
        """Check the payload against the signed digests (read only)."""
        self._scan()

    def copy_raw(self, dest: Path, meanwhile: Callable[[], Any] | None = None) -> None:
        """Copy the payload into `dest` unchecked, in the kernel (sendfile), fsynced: for a sealed model
        whose copy the store then authenticates chunk by chunk (GCM tags, under its content key). The
        copy's pages are in the page cache before they are on disk: `meanwhile()` (that check) runs
        while the fsync does, and a failure of either is raised once both are done."""
        with open(self.path, "rb") as src, open(dest, "wb") as out:
            left, at = self.manifest["payload"]["size"], self.payload_offset
            while left > 0:
                n = os.sendfile(out.fileno(), src.fileno(), at, min(left, 1 << 30))
                if not n:
                    raise BundleError("update bundle payload is truncated")
                left, at = left - n, at + n
            if meanwhile is None:
                os.fsync(out.fileno())
                return
            with ThreadPoolExecutor(1, thread_name_prefix="codemoat-fsync") as pool:
                synced = pool.submit(os.fsync, out.fileno())
                try:
                    meanwhile()
                finally:
                    synced.result()

    def copy_payload(self, dest: Path) -> None:
        """Copy the payload into `dest` (fsynced), checking it on the way: one read of the bundle. Each
        chunk is written from the buffer it was checked in, once it has checked out (format 2)."""
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            self._scan(lambda lo, part: pwrite_all(fd, part, lo))
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_payload(self) -> bytes:
        out = bytearray(self.manifest["payload"]["size"])

        def put(lo: int, part: memoryview) -> None:
            out[lo : lo + len(part)] = part

        self._scan(put)
        return bytes(out)

    def _scan(self, then: Callable[[int, memoryview], Any] | None = None) -> None:
        """Read the payload chunk by chunk, check each (format 2: against its own digest, chunks in
        parallel; format 1: one running SHA-256, in order) and hand it to `then(offset, chunk)`."""
        p = self.manifest["payload"]
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            read_at = file_reader(fd, self.payload_offset)
            if self.format_version == 1:
                h = hashlib.sha256()
                each_chunk(read_at, p["size"], LEGACY_BLOCK, lambda i, part: h.update(part) or True, then, threads=1)
                if h.hexdigest() != p["sha256"]:
                    raise BundleError("update bundle payload does not match its signed digest (changed or damaged)")
                return
            chunks = p["chunks"]
            bad = each_chunk(
                read_at, p["size"], p["chunk_size"], lambda i, part: hashlib.sha256(part).hexdigest() == chunks[i], then
            )
        finally:
            os.close(fd)
        if bad is not None:
            raise BundleError(
                f"update bundle payload chunk {bad} of {len(chunks)} does not match its signed digest (changed or damaged)"
            )

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


def file_reader(fd: int, base: int = 0) -> Callable[[int, memoryview], None]:
    """`read_at(offset, buffer)`: fills `buffer` from `fd` at `base + offset` (one line if the file ends first)."""

    def read_at(lo: int, part: memoryview) -> None:
        got = 0
        while got < len(part):
            n = os.preadv(fd, [part[got:]], base + lo + got)
            if not n:
                raise BundleError("update bundle payload is truncated")
            got += n

    return read_at
