"""The sealed model container (.moat): a signed manifest, then AES-256-GCM chunks (docs/formats.md).

    magic "CODEMOAT" | version u16 | manifest length u32 | manifest (canonical JSON)
    | Ed25519 signature (64) | chunk 0 ciphertext + tag | ... | chunk n-1 ciphertext + tag

Chunk i uses nonce = i (u64, big-endian) || final flag (u32) and associated data
"codemoat-chunk-v1" || SHA-256(header) || i || final, under a random per-file content key
(NIST SP 800-38D: a nonce is never reused with a key, since the key is never reused). The
signature binds every header field, the header hash binds every chunk to this manifest and
its place, and the final flag plus the signed plaintext size reject truncation and extension.
Decryption writes straight into a caller's buffer (`AESGCM.decrypt_into`): a sealed memfd.
Writing one is `sealer.py`'s.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import mmap
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..cores import usable_cores
from .codec import VaultError, b64d, ed_public, key_id, verify
from .signedfile import read_header

MAGIC = b"CODEMOAT"
VERSION = 1
PREFIX = struct.Struct(">8sHI")  # magic, version, manifest length
TAG_LEN = 16
DEFAULT_CHUNK = 4 << 20
MAX_MANIFEST = 1 << 20
SIGN_DOMAIN = b"codemoat-manifest-v1"
CHUNK_DOMAIN = b"codemoat-chunk-v1"
FORMATS = ("gguf", "safetensors")
MANIFEST_FIELDS = {
    "file_id": str,
    "model_id": str,
    "format": str,
    "plaintext_size": int,
    "plaintext_sha256": str,
    "chunk_size": int,
    "customer": str,
    "customer_id": str,
    "key_id": str,
    "created": int,
    "vendor_key": str,
    "parts": list,
    "fingerprinted": bool,
}


def default_threads() -> int:
    """Decryption workers: the cores this process may use, at most 8 (memory bandwidth runs out)."""
    return max(1, min(usable_cores(), 8))


def content_key_id(key: bytes) -> str:
    """A commitment to the content key (safe to publish: SHA-256 of a 256-bit random key)."""
    return hashlib.sha256(b"codemoat-key-id\x00" + key).hexdigest()[:32]


def chunk_count(size: int, chunk: int) -> int:
    return max(1, -(-size // chunk))


def chunk_nonce(i: int, final: bool) -> bytes:
    """Chunk i's AES-GCM nonce: i (u64) || final flag (u32)."""
    return struct.pack(">QI", i, 1 if final else 0)


def chunk_aad(header_hash: bytes, i: int, final: bool) -> bytes:
    """Chunk i's associated data: the domain, the header's hash, i and the final flag."""
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
    def check(cls, fields: Any) -> Manifest:
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
            if not (
                isinstance(p, dict)
                and isinstance(p.get("name"), str)
                and isinstance(p.get("offset"), int)
                and isinstance(p.get("size"), int)
                and p["offset"] == end
                and p["size"] >= 0
            ):
                raise VaultError("sealed file manifest parts are malformed")
            end += p["size"]
        if end != fields["plaintext_size"]:
            raise VaultError("sealed file manifest parts do not add up to the plaintext size")
        return cls(fields)


class SealedFile:
    """An opened .moat file whose header signature has been checked; chunks are checked on decrypt."""

    def __init__(self, path: str | Path, offset: int = 0):
        """`offset`: where the sealed file starts inside `path` (the payload of a model update bundle,
        which ends where the file does)."""
        self.path = Path(path)
        h = read_header(
            self.path,
            prefix=PREFIX,
            magic=MAGIC,
            versions=(VERSION,),
            max_manifest=MAX_MANIFEST,
            what="sealed file",
            offset=offset,
        )
        self.file_size = h.file_size
        self.manifest = Manifest.check(h.fields)
        verify(
            ed_public(h.fields["vendor_key"], "manifest vendor key"), h.signature, SIGN_DOMAIN, h.signed, "sealed file manifest"
        )
        self.header_hash = hashlib.sha256(h.signed).digest()
        self.payload_offset = offset + h.payload_offset  # in `path`
        self._offset = offset
        m = self.manifest
        self.n_chunks = chunk_count(m.plaintext_size, m.chunk_size)
        expect = h.payload_offset + m.plaintext_size + TAG_LEN * self.n_chunks
        if self.file_size < expect:
            raise VaultError(f"sealed file is truncated: {self.file_size} bytes, expected {expect}")
        if self.file_size > expect:
            raise VaultError(f"sealed file has {self.file_size - expect} unexpected trailing bytes")

    @property
    def manifest_sha256(self) -> str:
        return self.header_hash.hex()

    @property
    def vendor_key_id(self) -> str:
        return key_id(b64d(self.manifest.vendor_key))

    def describe(self) -> dict[str, Any]:
        """Everything `inspect` shows: the manifest, no secret."""
        d = dict(self.manifest.fields)
        d.update(
            kind="sealed-model",
            version=VERSION,
            chunks=self.n_chunks,
            file_size=self.file_size,
            manifest_sha256=self.manifest_sha256,
            vendor_key_id=self.vendor_key_id,
        )
        return d

    def decrypt_into(
        self, key: bytes, out: memoryview, *, check_sha256: bool = False, progress=None, threads: int | None = None
    ) -> None:
        """Decrypt and authenticate every chunk into `out` (exactly `plaintext_size` bytes, writable).

        Chunks are independent, so `threads` workers (default: the usable cores, at most 8) take one
        contiguous range each; AES-GCM releases the GIL. Raises `VaultError` naming a chunk that
        fails; `out` then holds partial plaintext, which the caller must zero (a memfd's `close()`
        does)."""
        self._check_key(key)
        m = self.manifest
        with memoryview(out).cast("B") as view:
            if len(view) != m.plaintext_size:
                raise ValueError(f"output buffer is {len(view)} bytes, plaintext is {m.plaintext_size}")
            after = progress and (lambda lo, out: progress(len(out)))
            self._decrypt_file(key, lambda: lambda lo, size: view[lo : lo + size], after, threads)
            if check_sha256:
                self._check_digest(hashlib.sha256(view))

    def decrypt_to(
        self, key: bytes, write: Callable[[int, memoryview], Any], *, check_sha256: bool = False, threads: int | None = None
    ) -> None:
        """Decrypt chunk by chunk into scratch buffers and hand each to `write(offset, plaintext)`.

        For a destination best filled by a system call: `os.pwrite` into a memfd allocates its
        pages in the kernel, several times cheaper than faulting them in through a mapping. Each
        worker has its own scratch buffer (`write` may be called from several threads at once, in
        any order; with `check_sha256`, one thread, in order). Scratch buffers are zeroed before
        returning."""
        self._check_key(key)
        m = self.manifest
        scratches: list[bytearray] = []

        def scratch() -> Callable[[int, int], memoryview]:
            buf = bytearray(max(1, min(m.chunk_size, m.plaintext_size)))
            scratches.append(buf)
            view = memoryview(buf)
            return lambda lo, size: view[:size]

        digest = hashlib.sha256() if check_sha256 else None

        def after(lo: int, out: memoryview) -> None:
            if digest is not None:
                digest.update(out)
            write(lo, out)

        try:
            self._decrypt_file(key, scratch, after, 1 if check_sha256 else threads)
        finally:
            for buf in scratches:
                buf[:] = bytes(len(buf))
        if digest is not None:
            self._check_digest(digest)

    def decrypt_chunks(
        self,
        key: bytes,
        order: Iterable[int],
        write: Callable[[int, memoryview], Any],
        stop: threading.Event | None = None,
    ) -> None:
        """Decrypt the chunks `order` names, in that order (a loader's order, not the file's), each into a
        scratch buffer, and hand it to `write(offset, plaintext)` only once its tag has checked out, so
        the destination never holds unauthenticated bytes. `order` may be shared by several threads
        calling this at once (it must then be thread-safe). Raises `VaultError` naming the first chunk
        that fails; returns early once `stop` is set. The scratch buffer is zeroed before returning."""
        self._check_key(key)
        m, n = self.manifest, self.n_chunks
        stop = stop or threading.Event()
        scratch = bytearray(max(1, min(m.chunk_size, m.plaintext_size)))
        view = memoryview(scratch)
        try:
            with self._ciphertext() as (src, drop):
                for i in order:
                    if not 0 <= i < n:
                        raise ValueError(f"no chunk {i} in a file of {n}")
                    bad = self._decrypt_range(key, src, i, i + 1, lambda lo, size: view[:size], write, stop, drop)
                    if bad is not None:
                        raise VaultError(f"chunk {bad} of {n} failed authentication (the sealed file was altered)")
                    if stop.is_set():
                        return
        finally:
            scratch[:] = bytes(len(scratch))
            view.release()

    def _check_key(self, key: bytes) -> None:
        if content_key_id(key) != self.manifest.key_id:
            raise VaultError("content key does not match this sealed file (key id differs)")

    def _check_digest(self, digest: Any) -> None:
        if digest.hexdigest() != self.manifest.plaintext_sha256:
            raise VaultError("plaintext SHA-256 does not match the manifest")

    def _decrypt_file(
        self,
        key: bytes,
        make_dest: Callable[[], Callable[[int, int], memoryview]],
        after: Callable[[int, memoryview], Any] | None,
        threads: int | None,
    ) -> None:
        """Authenticate and decrypt every chunk, `threads` contiguous ranges at once; `make_dest()` is
        called once per worker and gives where chunk (offset, size) is decrypted to."""
        n = self.n_chunks
        workers = max(1, min(threads or default_threads(), n // 2))  # at least two chunks each
        with self._ciphertext() as (src, drop):
            stop = threading.Event()
            if workers == 1:
                failed = [self._decrypt_range(key, src, 0, n, make_dest(), after, stop, drop)]
            else:
                bounds = [n * w // workers for w in range(workers + 1)]
                with ThreadPoolExecutor(workers, thread_name_prefix="codemoat-decrypt") as pool:
                    futures = [
                        pool.submit(self._decrypt_range, key, src, bounds[w], bounds[w + 1], make_dest(), after, stop, drop)
                        for w in range(workers)
                    ]
                    failed = [fut.result() for fut in futures]
        bad = min((i for i in failed if i is not None), default=None)
        if bad is not None:
            raise VaultError(f"chunk {bad} of {n} failed authentication (the sealed file was altered)")

    @contextlib.contextmanager
    def _ciphertext(self) -> Iterator[tuple[memoryview, Callable[[int, int], None]]]:
        """The file mapped read-only, and `drop(pos, length)` to release a chunk's pages once read."""
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_size != self._offset + self.file_size:
                raise VaultError("sealed file changed size while being read")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                with memoryview(mm) as src:
                    yield src, functools.partial(_drop_pages, mm)
            finally:
                mm.close()

    def _decrypt_range(
        self,
        key: bytes,
        src: memoryview,
        first: int,
        last: int,
        dest: Callable[[int, int], memoryview],
        after: Callable[[int, memoryview], Any] | None,
        stop: threading.Event,
        drop: Callable[[int, int], None] = lambda pos, length: None,
    ) -> int | None:
        """Chunks first..last-1; the index of the first that fails authentication, or None. Sets `stop`
        on a failure, and returns early once another worker has set it. `drop(pos, length)` releases
        a chunk's ciphertext pages once it is done."""
        m, n = self.manifest, self.n_chunks
        aead = AESGCM(key)
        try:
            for i in range(first, last):
                if stop.is_set():
                    return None
                lo = i * m.chunk_size
                size = min(m.chunk_size, m.plaintext_size - lo)
                pos = self.payload_offset + i * (m.chunk_size + TAG_LEN)
                final = i == n - 1
                out = dest(lo, size)
                try:
                    aead.decrypt_into(
                        chunk_nonce(i, final), src[pos : pos + size + TAG_LEN], chunk_aad(self.header_hash, i, final), out
                    )
                except InvalidTag:
                    stop.set()
                    return i
                if after is not None:
                    after(lo, out)
                drop(pos, size + TAG_LEN)
        except BaseException:
            stop.set()
            raise
        return None

    def decrypt(self, key: bytes, *, check_sha256: bool = True) -> bytearray:
        """Decrypt into a new bytearray (for safetensors, and for `verify`)."""
        out = bytearray(self.manifest.plaintext_size)
        self.decrypt_into(key, memoryview(out), check_sha256=check_sha256)
        return out


def _drop_pages(mm: mmap.mmap, pos: int, length: int) -> None:
    """Unmap the pages of [pos, pos + length) from this process (MADV_DONTNEED on a read-only
    file mapping: the page cache keeps them, the process's resident set does not), so reading a sealed
    file of any size costs at most the chunks in flight, not the file (verify's peak RSS on a 3 GB
    file was the file). Rounded down at both ends, so that chunks smaller than a page still let
    their pages go; a page shared with a neighbouring chunk is simply faulted in again (a read-only
    file mapping: dropping a page never changes what is read)."""
    start = pos // mmap.PAGESIZE * mmap.PAGESIZE
    end = (pos + length) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
