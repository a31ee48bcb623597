"""Knowledge packs: a vendor's documentation and source, imported into the retrieval index.

A pack is a zip of text files. `update apply` decrypts it in memory and indexes it as its own
source, `pack.<name>`, readable by the groups the admin chooses; its index `root` is
`pack:<name>@<version>#<bundle id>` (no folder: nothing is extracted to disk). Member names are
checked (no absolute path, no `..`, no control or format characters: DEL, C1's CSI, bidi
overrides and zero-width marks that make a cited path show as another) and sizes capped, so a hostile or
broken zip is refused in one line instead of filling memory.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import CodemoatError
from ..text import unsafe_name

MAX_FILES = 50_000
MAX_TOTAL = 512 << 20  # uncompressed bytes in one pack
MAX_FILE = 4 << 20  # larger members are skipped (the indexer skips them anyway)


def source_name(name: str) -> str:
    return f"pack.{name}"


def source_root(manifest: dict[str, Any]) -> str:
    return f"pack:{manifest['name']}@{manifest['version']}#{manifest['bundle_id']}"


def members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of each file in the pack, names checked, sizes capped."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        infos = z.infolist()
    except (zipfile.BadZipFile, ValueError):
        raise CodemoatError("knowledge pack is not a valid zip file") from None
    if len(infos) > MAX_FILES:
        raise CodemoatError(f"knowledge pack holds {len(infos)} files (at most {MAX_FILES})")
    total, seen = 0, set[str]()
    with z:
        for info in infos:
            if info.is_dir():
                continue
            name = info.filename
            parts = name.split("/")
            if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts) or unsafe_name(name):
                raise CodemoatError(f"knowledge pack member {name[:80]!r} has an unsafe path")
            if name in seen:  # the index holds one file a path: a second failed its insert after the switch, at every run
                raise CodemoatError(f"knowledge pack holds member {name[:80]!r} twice")
            seen.add(name)
            if info.file_size > MAX_FILE:
                continue
            total += info.file_size
            if total > MAX_TOTAL:
                raise CodemoatError(f"knowledge pack is over {MAX_TOTAL >> 20} MiB uncompressed")
            try:
                raw = z.read(info)
            except (zipfile.BadZipFile, ValueError, OSError):
                raise CodemoatError(f"knowledge pack member {name[:80]!r} is damaged") from None
            if len(raw) > MAX_FILE:
                raise CodemoatError(f"knowledge pack member {name[:80]!r} is larger than its header says")
            yield name, raw


def import_pack(data: bytes, manifest: dict[str, Any], groups: Sequence[str]) -> dict[str, Any]:
    """Index the pack as source `pack.<name>` (replacing an older version of it in one transaction)."""
    from ..index.store import SqliteIndex
    from ..index.update import import_source

    store = SqliteIndex()
    try:
        stats = import_source(store, source_name(manifest["name"]), source_root(manifest), groups, members(data))
    finally:
        store.close()
    return {"source": stats.repo, "files": stats.files, "chunks": stats.chunks, "symbols": stats.symbols}


def indexed_root(name: str) -> str | None:
    """The `root` the index holds for pack `name` now (None: not indexed)."""
    from ..index.store import SqliteIndex, default_path

    if not default_path().exists():
        return None
    store = SqliteIndex()
    try:
        return next((r.root for r in store.repos() if r.name == source_name(name)), None)
    finally:
        store.close()


def check_free(name: str) -> None:
    """Refuse (one line) a pack whose source name an indexed repository holds: its import failed only once
    `update apply` had switched to it, and again in the reconcile every later `update` command runs first."""
    root = indexed_root(name)
    if root is not None and not root.startswith("pack:"):
        raise CodemoatError(
            f"{source_name(name)!r} is an indexed repository, not a knowledge pack: "
            f"knowledge pack {name!r} cannot be installed beside it"
        )


def remove_pack(name: str) -> None:
    from ..index.store import SqliteIndex
    from ..errors import NotFound

    store = SqliteIndex()
    try:
        store.remove_repo(source_name(name))
    except NotFound:
        pass
    finally:
        store.close()


def pack_groups(name: str) -> list[str] | None:
    from ..index.store import SqliteIndex, default_path

    if not default_path().exists():
        return None
    store = SqliteIndex()
    try:
        r = next((r for r in store.repos() if r.name == source_name(name)), None)
        return list(r.groups) if r else None
    finally:
        store.close()
