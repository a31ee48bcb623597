"""The signed header both codemoat container files start with: a fixed prefix, a canonical-JSON
manifest, an Ed25519 signature, then the payload (docs/formats.md: sealed model, update bundle).

    prefix (magic, format version, ..., manifest length) | manifest | signature (64) | payload

`read_header` checks what the two formats share (a regular file, the magic, a version this codemoat
reads, the manifest's length and JSON form) and returns the parts; each format checks its own
fields and the signature (over prefix + manifest under its own domain) itself.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import paths
from .codec import VaultError, canonical

SIG_LEN = 64


@dataclass
class Header:
    file_size: int  # from the header's start to the end of the file
    prefix: tuple[Any, ...]  # the unpacked prefix: magic, version, ..., manifest length
    signed: bytes  # prefix + manifest: what the signature covers
    signature: bytes
    fields: dict[str, Any]  # the manifest, parsed (canonical form checked)

    @property
    def payload_offset(self) -> int:
        return len(self.signed) + SIG_LEN


def read_header(
    path: Path,
    *,
    prefix: struct.Struct,
    magic: bytes,
    versions: tuple[int, ...],
    max_manifest: int,
    what: str,
    error: type[VaultError] = VaultError,
    offset: int = 0,
) -> Header:
    """Open `path` and read the header that starts `offset` bytes into it (a sealed model inside an update
    bundle); `error` (one line naming `what`, e.g. "update bundle") on any fault. Offsets in the result
    are from the header's start."""
    fd, st = paths.open_regular(path, what, error)  # a FIFO or a device is refused, not waited on
    try:
        head = os.pread(fd, prefix.size, offset)
        if len(head) < prefix.size:
            raise error(f"{path.name} is not a codemoat {what} (too short)")
        fields = prefix.unpack(head)
        if fields[0] != magic:
            raise error(f"{path.name} is not a codemoat {what} (bad magic)")
        if fields[1] not in versions:
            raise error(f"{what} version {fields[1]} is not supported (this codemoat reads {' and '.join(map(str, versions))})")
        mlen = fields[-1]
        if mlen > max_manifest or offset + prefix.size + mlen + SIG_LEN > st.st_size:
            raise error(f"{what} is truncated inside its header")
        body = os.pread(fd, mlen + SIG_LEN, offset + prefix.size)
    finally:
        os.close(fd)
    manifest, signature = body[:mlen], body[mlen:]
    try:
        parsed = json.loads(manifest.decode("utf-8"))
        canon = canonical(parsed)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise error(f"{what} manifest is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise error(f"{what} manifest is not a JSON object")
    if canon != manifest:
        raise error(f"{what} manifest is not in canonical form")
    return Header(st.st_size - offset, fields, head + manifest, signature, parsed)
