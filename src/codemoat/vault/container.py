"""The sealed model container (.moat): a signed manifest, then AES-256-GCM chunks (docs/formats.md).

    magic "CODEMOAT" | version u16 | manifest length u32 | manifest (canonical JSON)
    | Ed25519 signature (64) | chunk 0 ciphertext + tag | ... | chunk n-1 ciphertext + tag

Chunk i uses nonce = i (u64, big-endian) || final flag (u32) and associated data
"codemoat-chunk-v1" || SHA-256(header) || i || final, under a random per-file content key
(NIST SP 800-38D: a nonce is never reused with a key, since the key is never reused). The
signature binds every header field, the header hash binds every chunk to this manifest and
its place, and the final flag plus the signed plaintext size reject truncation and extension.
Decryption writes straight into a caller's buffer (`AESGCM.decrypt_into`): a sealed memfd.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .codec import VaultError, b64d, b64e, canonical, ed_public, key_id, public_raw, sign, verify

MAGIC = b"CODEMOAT"
VERSION = 1
PREFIX = struct.Struct(">8sHI")  # magic, version, manifest length
SIG_LEN = 64
TAG_LEN = 16
DEFAULT_CHUNK = 4 << 20
MAX_MANIFEST = 1 << 20
SIGN_DOMAIN = b"codemoat-manifest-v1"
CHUNK_DOMAIN = b"codemoat-chunk-v1"
FORMATS = ("gguf", "safetensors")
MANIFEST_FIELDS = {
    "file_id": str, "model_id": str, "format": str, "plaintext_size": int, "plaintext_sha256": str,
    "chunk_size": int, "customer": str, "customer_id": str, "key_id": str, "created": int,
    "vendor_key": str, "parts": list, "fingerprinted": bool,
}


def content_key_id(key: bytes) -> str:
    """A commitment to the content key (safe to publish: SHA-256 of a 256-bit random key)."""
    return hashlib.sha256(b"codemoat-key-id\x00" + key).hexdigest()[:32]


def chunk_count(size: int, chunk: int) -> int:
    return max(1, -(-size // chunk))


def _nonce(i: int, final: bool) -> bytes:
    return struct.pack(">QI", i, 1 if final else 0)


def _aad(header_hash: bytes, i: int, final: bool) -> bytes:
    return CHUNK_DOMAIN + header_hash + struct.pack(">QB", i, 1 if final else 0)


@dataclass
class Manifest:
    """What a sealed file claims about itself; every field is covered by the vendor's signature."""

    fields: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def check(cls, fields: Any) -> "Manifest":
        if not isinstance(fields, dict):
            raise VaultError("sealed file manifest is not a JSON object")
        for name, typ in MANIFEST_FIELDS.items():
            v = fields.get(name)
            if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
                raise VaultError(f"sealed file manifest field {name!r} is missing or malformed")
        if fields["format"] not in FORMATS:
            raise VaultError(f"sealed file format {fields['format']!r} is not one of {', '.join(FORMATS)}")
        if fields["plaintext_size"] < 0 or not (4096 <= fields["chunk_size"] <= 1 << 30):
            raise VaultError("sealed file manifest sizes are out of range")
        end = 0
        for p in fields["parts"]:
            if not (isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("offset"), int)
                    and isinstance(p.get("size"), int) and p["offset"] == end and p["size"] >= 0):
                raise VaultError("sealed file manifest parts are malformed")
            end += p["size"]
        if end != fields["plaintext_size"]:
            raise VaultError("sealed file manifest parts do not add up to the plaintext size")
        return cls(fields)


class SealedFile:
    """An opened .moat file whose header signature has been checked; chunks are checked on decrypt."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise VaultError(f"sealed file not found: {self.path}") from None
        except OSError as e:
            raise VaultError(f"cannot read sealed file {self.path}: {e.strerror}") from None
        try:
            self.file_size = os.fstat(fd).st_size
            head = os.pread(fd, PREFIX.size, 0)
            if len(head) < PREFIX.size:
                raise VaultError(f"{self.path.name} is not a codemoat sealed file (too short)")
            magic, version, mlen = PREFIX.unpack(head)
            if magic != MAGIC:
                raise VaultError(f"{self.path.name} is not a codemoat sealed file (bad magic)")
            if version != VERSION:
                raise VaultError(f"sealed file version {version} is not supported (expected {VERSION})")
            if mlen > MAX_MANIFEST or PREFIX.size + mlen + SIG_LEN > self.file_size:
                raise VaultError("sealed file is truncated inside its header")
            body = os.pread(fd, mlen + SIG_LEN, PREFIX.size)
            signed, signature = head + body[:mlen], body[mlen:]
            try:
                fields = json.loads(body[:mlen].decode("utf-8"))
                canonical_form = canonical(fields)
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise VaultError("sealed file manifest is not valid JSON") from None
            self.manifest = Manifest.check(fields)
            if canonical_form != body[:mlen]:
                raise VaultError("sealed file manifest is not in canonical form")
            verify(ed_public(fields["vendor_key"], "manifest vendor key"), signature, SIGN_DOMAIN, signed,
                   "sealed file manifest")
            self.header_hash = hashlib.sha256(signed).digest()
            self.payload_offset = PREFIX.size + mlen + SIG_LEN
            m = self.manifest
            self.n_chunks = chunk_count(m.plaintext_size, m.chunk_size)
            expect = self.payload_offset + m.plaintext_size + TAG_LEN * self.n_chunks
            if self.file_size < expect:
                raise VaultError(f"sealed file is truncated: {self.file_size} bytes, expected {expect}")
            if self.file_size > expect:
                raise VaultError(f"sealed file has {self.file_size - expect} unexpected trailing bytes")
        finally:
            os.close(fd)

    @property
    def manifest_sha256(self) -> str:
        return self.header_hash.hex()

    @property
    def vendor_key_id(self) -> str:
        return key_id(b64d(self.manifest.vendor_key))

    def describe(self) -> dict[str, Any]:
        """Everything `inspect` shows: the manifest, no secret."""
        d = dict(self.manifest.fields)
        d.update(kind="sealed-model", version=VERSION, chunks=self.n_chunks, file_size=self.file_size,
                 manifest_sha256=self.manifest_sha256, vendor_key_id=self.vendor_key_id)
        return d

    def decrypt_into(self, key: bytes, out: memoryview, *, check_sha256: bool = False, progress=None) -> None:
        """Decrypt and authenticate every chunk into `out` (exactly `plaintext_size` bytes, writable).

        Raises `VaultError` naming the first chunk that fails; `out` then holds partial
        plaintext, which the caller must zero (a memfd's `close()` does)."""
        m = self.manifest
        if content_key_id(key) != m.key_id:
            raise VaultError("content key does not match this sealed file (key id differs)")
        with memoryview(out).cast("B") as view:
            if len(view) != m.plaintext_size:
                raise ValueError(f"output buffer is {len(view)} bytes, plaintext is {m.plaintext_size}")
            self._decrypt_file(key, lambda lo, size: view[lo: lo + size], progress and (lambda lo, out: progress(len(out))),
                               check_sha256)

    def decrypt_to(self, key: bytes, write: Callable[[int, memoryview], Any], *, check_sha256: bool = False) -> None:
        """Decrypt chunk by chunk into a scratch buffer and hand each to `write(offset, plaintext)`.

        For a destination best filled by a system call: `os.pwrite` into a memfd allocates its
        pages in the kernel, several times cheaper than faulting them in through a mapping. The
        scratch buffer is zeroed before returning."""
        m = self.manifest
        if content_key_id(key) != m.key_id:
            raise VaultError("content key does not match this sealed file (key id differs)")
        scratch = bytearray(max(1, min(m.chunk_size, m.plaintext_size)))
        try:
            with memoryview(scratch) as view:
                self._decrypt_file(key, lambda lo, size: view[:size], write, check_sha256)
        finally:
            scratch[:] = bytes(len(scratch))

    def _decrypt_file(self, key: bytes, dest: Callable[[int, int], memoryview],
                      after: Callable[[int, memoryview], Any] | None, check_sha256: bool) -> None:
        m, n = self.manifest, self.n_chunks
        aead = AESGCM(key)
        digest = hashlib.sha256() if check_sha256 else None
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_size != self.file_size:
                raise VaultError("sealed file changed size while being read")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                with memoryview(mm) as src:
                    pos = self.payload_offset
                    for i in range(n):
                        lo = i * m.chunk_size
                        size = min(m.chunk_size, m.plaintext_size - lo)
                        final = i == n - 1
                        out = dest(lo, size)
                        try:
                            aead.decrypt_into(_nonce(i, final), src[pos: pos + size + TAG_LEN],
                                              _aad(self.header_hash, i, final), out)
                        except InvalidTag:
                            raise VaultError(f"chunk {i} of {n} failed authentication (the sealed file was altered)") from None
                        if digest is not None:
                            digest.update(out)
                        if after is not None:
                            after(lo, out)
                        pos += size + TAG_LEN
            finally:
                mm.close()
        if digest is not None and digest.hexdigest() != m.plaintext_sha256:
            raise VaultError("plaintext SHA-256 does not match the manifest")

    def decrypt(self, key: bytes, *, check_sha256: bool = True) -> bytearray:
        """Decrypt into a new bytearray (for safetensors, and for `verify`)."""
        out = bytearray(self.manifest.plaintext_size)
        self.decrypt_into(key, memoryview(out), check_sha256=check_sha256)
        return out


def seal_bytes(
    data: bytes | bytearray | memoryview,
    out_path: str | Path,
    *,
    signing_key: Ed25519PrivateKey,
    content_key: bytes,
    model_id: str,
    fmt: str,
    customer: str,
    customer_id: str,
    parts: list[dict[str, Any]] | None = None,
    fingerprinted: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    file_id: str | None = None,
    created: int | None = None,
) -> SealedFile:
    """Encrypt `data` into a new sealed file (written beside `out_path`, then renamed into place)."""
    if fmt not in FORMATS:
        raise VaultError(f"model format {fmt!r} is not one of {', '.join(FORMATS)}")
    if len(content_key) != 32:
        raise ValueError("content key must be 32 bytes")
    src = memoryview(data).cast("B")
    size = len(src)
    fields = {
        "file_id": file_id or uuid.uuid4().hex,
        "model_id": model_id,
        "format": fmt,
        "plaintext_size": size,
        "plaintext_sha256": hashlib.sha256(src).hexdigest(),
        "chunk_size": chunk_size,
        "customer": customer,
        "customer_id": customer_id,
        "key_id": content_key_id(content_key),
        "created": int(time.time()) if created is None else created,
        "vendor_key": b64e(public_raw(signing_key.public_key())),
        "parts": parts if parts is not None else [{"name": f"model.{fmt}", "offset": 0, "size": size}],
        "fingerprinted": fingerprinted,
    }
    Manifest.check(fields)
    manifest = canonical(fields)
    signed = PREFIX.pack(MAGIC, VERSION, len(manifest)) + manifest
    header_hash = hashlib.sha256(signed).digest()
    aead = AESGCM(content_key)
    n = chunk_count(size, chunk_size)
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".part")
    cbuf = bytearray(chunk_size + TAG_LEN)
    cview = memoryview(cbuf)
    try:
        with open(tmp, "wb") as f:
            f.write(signed)
            f.write(sign(signing_key, SIGN_DOMAIN, signed))
            for i in range(n):
                lo = i * chunk_size
                csize = min(chunk_size, size - lo)
                final = i == n - 1
                aead.encrypt_into(_nonce(i, final), src[lo : lo + csize], _aad(header_hash, i, final),
                                  cview[: csize + TAG_LEN])
                f.write(cview[: csize + TAG_LEN])
        os.replace(tmp, out_path)
    finally:
        cview.release()
        tmp.unlink(missing_ok=True)
    return SealedFile(out_path)
