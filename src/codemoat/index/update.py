"""Index a repository, and keep it current: only files whose content hash changed are re-parsed.

Files are read, hashed, chunked and written one at a time (memory stays bounded whatever the
repository's size) inside one transaction: an interrupted run, by Ctrl-C or by a kill, leaves the
previous index exactly as it was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CodemoatError
from ..names import RULE, valid_name
from ..paths import home
from .chunk import Chunk, chunk_file
from .store import RepoInfo, SqliteIndex
from .reader import GONE, Refused, RepoReader
from .walk import decode, git_remote, is_indexable_name, scan

Progress = Callable[[int, int, str], None]  # (files done, files in total, current path)

_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass
class UpdateStats:
    repo: str
    files: int = 0  # files considered
    unchanged: int = 0
    indexed: int = 0  # new or changed files (re)parsed
    removed: int = 0  # files that left the index
    skipped: int = 0  # binaries, minified, generated, too large
    chunks: int = 0  # chunks written in this run
    symbols: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # path -> why it was never read (symlink, `..`, FIFO…)

    def report(self, keep: int = 50) -> dict:
        """What the console's Repositories page shows of this update (the first `keep` refused paths)."""
        return {
            "indexed": self.indexed,
            "removed": self.removed,
            "skipped": self.skipped,
            "refused_count": len(self.refused),
            "refused": dict(list(self.refused.items())[:keep]),
        }


def parse_groups(spec: str | Sequence[str] | None) -> list[str]:
    """`"a, b"` -> ['a', 'b'], validated as the accounts name groups (`codemoat.names`)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec or [])
    groups = sorted({g.strip() for g in items if g.strip()})
    for g in groups:
        if not valid_name(g):
            raise CodemoatError(f"invalid group name {g!r}: {RULE}")
    return groups


def add_repository(store: SqliteIndex, path: Path | str, name: str, groups: Sequence[str],
                   include: Sequence[str] = (), exclude: Sequence[str] = (),
                   progress: Progress | None = None) -> UpdateStats:  # fmt: skip
    """Register a repository under `name`, readable by `groups`, and index it."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise CodemoatError(f"not a folder: {path}")
    if not name or not set(name) <= _NAME_OK:
        raise CodemoatError(f"invalid repository name {name!r}: use letters, digits, '-', '_' and '.'")
    groups = parse_groups(groups)
    if not groups:
        raise CodemoatError("a repository needs at least one group (e.g. --groups everyone)")
    for p in _private(store):
        if root == p or p in root.parents:
            raise CodemoatError(
                f"{path} is inside codemoat's data folder {p}: it holds the machine key and databases, never a repository"
            )
    st = root.stat()  # the folder itself: a later update refuses another one at this path
    with store.transaction():
        store.add_repo(name, str(root), groups, git_remote(root), include, exclude, (st.st_dev, st.st_ino))
        _leave_enclosing(store, name, root)
        return _update(store, store.repo(name), progress)


def _leave_enclosing(store: SqliteIndex, name: str, root: Path) -> None:
    """A repository added inside an indexed one: its files leave the enclosing repository's index now,
    not at that one's next update (they belong to this repository's groups from now on; an update of
    the enclosing repository refuses its folder)."""
    for other in store.repos():
        if other.name == name or Path(other.root) not in root.parents:
            continue
        prefix = root.relative_to(other.root).as_posix() + "/"
        for rel, (fid, _h) in store.file_hashes(other.id).items():
            if rel.startswith(prefix):
                store.delete_file(fid)


PACK_ROOT = "pack:"  # the `root` of a knowledge pack: indexed from memory, no folder (codemoat.updates)


def import_source(store: SqliteIndex, name: str, root: str, groups: Sequence[str],
                  files: Iterable[tuple[str, bytes]]) -> UpdateStats:  # fmt: skip
    """Index files given in memory (a vendor's knowledge pack) as the source `name`, replacing
    whatever it held, in one transaction: readers see the old source or the new one, never half."""
    if not name or not set(name) <= _NAME_OK or not root.startswith(PACK_ROOT):
        raise CodemoatError(f"invalid knowledge-pack source {name!r}")
    groups = parse_groups(groups)
    if not groups:
        raise CodemoatError("a knowledge pack needs at least one group (e.g. --groups everyone)")
    with store.transaction():
        old = next((r for r in store.repos() if r.name == name), None)
        if old is not None:
            if not old.root.startswith(PACK_ROOT):
                raise CodemoatError(f"{name!r} is an indexed repository, not a knowledge pack")
            store.delete_repo_rows(old.id)
        store.add_repo(name, root, groups, None)
        info = store.repo(name)
        stats = UpdateStats(name)
        for rel, raw in files:
            stats.files += 1
            if not is_indexable_name(rel):
                stats.skipped += 1
                continue
            _one(store, info, stats, {}, rel, raw)
        store.touch_repo(info.id, stats.report())
    return stats


def update_repository(store: SqliteIndex, name: str, progress: Progress | None = None) -> UpdateStats:
    """Bring one repository's index up to date with its folder."""
    info = store.repo(name)
    if info.root.startswith(PACK_ROOT):  # a knowledge pack changes only through `codemoat update apply`
        return UpdateStats(name)
    if not Path(info.root).is_dir():
        raise CodemoatError(f"repository {name!r}: its folder {info.root} is gone (`codemoat index remove {name}`)")
    with store.transaction():
        return _update(store, info, progress)


def _update(store: SqliteIndex, info: RepoInfo, progress: Progress | None) -> UpdateStats:
    root = Path(info.root)
    stats = UpdateStats(info.name)
    others = [Path(r.root) for r in store.repos() if r.id != info.id]
    private = _private(store)
    with RepoReader(root, others, private) as reader:
        _same_folder(store, info, reader)
        listing = scan(root, info.include, info.exclude, others, private)
        paths, stats.refused = listing.paths, listing.refused
        known = store.file_hashes(info.id)
        stats.files = len(paths)
        for i, rel in enumerate(paths, 1):
            if progress is not None:
                progress(i, len(paths), rel)
            _one(store, info, stats, known, rel, reader.read(rel))
    for _rel, (fid, _h) in known.items():  # deleted, now ignored, now skipped or refused
        store.delete_file(fid)
        stats.removed += 1
    store.touch_repo(info.id, stats.report())
    return stats


def _same_folder(store: SqliteIndex, info: RepoInfo, reader: RepoReader) -> None:
    """Refuse a root that is no longer the folder `index add` saw (by its inode): a parent of its path
    swapped for a link can lead anywhere, a subfolder of another repository included, which the path
    checks cannot tell. Recorded anew: a repository indexed before the index kept this, and the same
    inode on another device number (a volume mounted again: an NFS or cloud volume in a new pod gets a
    new one; another indexed repository's root with that inode is refused by device and inode anyway)."""
    if info.root_id is None or (info.root_id[1] == reader.root_id[1] and info.root_id[0] != reader.root_id[0]):
        store.set_root_id(info.id, reader.root_id)
    elif reader.root_id != info.root_id:
        raise CodemoatError(
            f"repository folder {info.root} is no longer the folder indexed as {info.name!r} (another folder is at "
            f"that path now, or a link on it leads elsewhere); if it is the same code, `codemoat index remove "
            f"{info.name}` and add it again"
        )


def _private(store: SqliteIndex) -> list[Path]:
    """Folders no repository may read: codemoat's data folder (the machine key, the databases)."""
    return [home().resolve()]


def _one(store: SqliteIndex, info: RepoInfo, stats: UpdateStats, known: dict, rel: str,
         raw: bytes | Refused | None) -> None:  # fmt: skip
    if isinstance(raw, Refused) and raw is not GONE:  # changed into a link (or a FIFO…) since the listing
        stats.refused[rel] = str(raw)
        return
    if raw is None or raw is GONE:
        stats.skipped += 1
        return
    digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
    old = known.get(rel)
    if old is not None and old[1] == digest:
        del known[rel]
        stats.unchanged += 1
        return
    text = decode(raw)
    if text is None:
        stats.skipped += 1
        return
    chunks, symbols = _chunk(rel, text)
    store.replace_file(info.id, rel, digest, text.count("\n") + 1, chunks, symbols, old[0] if old else None)
    known.pop(rel, None)
    stats.indexed += 1
    stats.chunks += len(chunks)
    stats.symbols += len(symbols)


def _chunk(rel: str, text: str) -> tuple[list[Chunk], list]:
    try:
        return chunk_file(rel, text)
    except RecursionError:  # pathologically nested source: fall back to line windows
        return chunk_file(rel + ".txt", text)
