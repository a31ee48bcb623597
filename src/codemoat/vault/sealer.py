"""Writing a sealed model container (.moat, laid out in `container.py` and docs/formats.md).

The plaintext is streamed through one chunk-sized buffer: each chunk is encrypted under a random
per-file content key with its own nonce and associated data (`container.chunk_nonce`, `chunk_aad`),
after the vendor-signed header; the file is written beside its name and renamed into place, and the
plaintext buffer is zeroed on the way out.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .codec import VaultError, b64e, canonical, public_raw, sign
from .container import (
    DEFAULT_CHUNK,
    FORMATS,
    MAGIC,
    PREFIX,
    SIGN_DOMAIN,
    TAG_LEN,
    VERSION,
    Manifest,
    SealedFile,
    chunk_aad,
    chunk_count,
    chunk_nonce,
    content_key_id,
)


def seal_bytes(
    data: bytes | bytearray | memoryview,
    out_path: str | Path,
    **kw: Any,
) -> SealedFile:
    """Encrypt `data` into a new sealed file (written beside `out_path`, then renamed into place)."""
    src = memoryview(data).cast("B")
    return seal_stream(lambda: iter((src,)), len(src), out_path, plaintext_sha256=hashlib.sha256(src).hexdigest(), **kw)


def seal_stream(
    pieces: Callable[[], Iterator[bytes | bytearray | memoryview]],
    size: int,
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
    plaintext_sha256: str | None = None,
) -> SealedFile:
    """Encrypt the plaintext that `pieces()` yields (`size` bytes in all) into a new sealed file.

    The signed header holds the plaintext's SHA-256 and every chunk's associated data holds the
    header's hash, so without `plaintext_sha256` the plaintext is read twice: `pieces` is called
    once to hash it and once to encrypt it, and the bytes encrypted are hashed again: a file that changed
    between the two reads is refused, where it was sealed under a header whose SHA-256 no customer's load
    could match. Memory stays at one chunk plus one piece, whatever the size."""
    if fmt not in FORMATS:
        raise VaultError(f"model format {fmt!r} is not one of {', '.join(FORMATS)}")
    if len(content_key) != 32:
        raise ValueError("content key must be 32 bytes")
    again = None  # the encrypted bytes' hash, when the plaintext is read twice
    if plaintext_sha256 is None:
        again = hashlib.sha256()
        digest, seen = hashlib.sha256(), 0
        for p in pieces():
            digest.update(p)
            seen += len(p)
        if seen != size:
            raise VaultError(f"model plaintext is {seen} bytes, expected {size}")
        plaintext_sha256 = digest.hexdigest()
    fields = {
        "file_id": file_id or uuid.uuid4().hex,
        "model_id": model_id,
        "format": fmt,
        "plaintext_size": size,
        "plaintext_sha256": plaintext_sha256,
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
    # a new file of a name nobody can guess, never through a link: a fixed `out.moat.part` that someone who can
    # write in the folder had made a symbolic link wrote the sealed bytes over the file it named (helper R5)
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex}.part")
    pbuf = bytearray(min(chunk_size, max(size, 1)))  # plaintext of the chunk being filled
    cbuf = bytearray(chunk_size + TAG_LEN)
    pview, cview = memoryview(pbuf), memoryview(cbuf)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
        with open(fd, "wb") as f:
            f.write(signed)
            f.write(sign(signing_key, SIGN_DOMAIN, signed))
            i = fill = done = 0

            def emit(csize: int) -> None:
                final = i == n - 1
                aead.encrypt_into(
                    chunk_nonce(i, final), pview[:csize], chunk_aad(header_hash, i, final), cview[: csize + TAG_LEN]
                )
                f.write(cview[: csize + TAG_LEN])

            for p in pieces():
                src = memoryview(p).cast("B")
                if again is not None:
                    again.update(src)
                at = 0
                while at < len(src):
                    want = min(chunk_size, size - i * chunk_size)
                    if want <= 0:
                        raise VaultError(f"model plaintext is longer than {size} bytes")
                    take = min(want - fill, len(src) - at)
                    pview[fill : fill + take] = src[at : at + take]
                    fill, at, done = fill + take, at + take, done + take
                    if fill == want:
                        emit(fill)
                        i, fill = i + 1, 0
            if done != size:
                raise VaultError(f"model plaintext is {done} bytes, expected {size}")
            if size == 0:  # one empty final chunk, as the format has always had
                emit(0)
        if again is not None and again.hexdigest() != plaintext_sha256:
            raise VaultError(
                "the model changed while it was sealed (its bytes hashed, then read again, differ): nothing was written"
            )
        os.replace(tmp, out_path)
    finally:
        pbuf[:] = bytes(len(pbuf))
        pview.release()
        cview.release()
        tmp.unlink(missing_ok=True)
    return SealedFile(out_path)
