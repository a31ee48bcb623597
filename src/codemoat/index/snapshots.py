"""The index as immutable snapshot files behind one pointer, for replicas that share a volume.

SQLite's WAL mode (the single-host index) keeps its index in shared memory (`-shm`), which only
works when every reader is on the same host (https://sqlite.org/wal.html, "WAL does not work over
a network filesystem"). When the index path is a directory, the index is kept this way instead:

    DIR/snapshots/snap-000012.db   complete index files, never written after they are published
    DIR/CURRENT                    the name of the current one (replaced by rename, never edited)
    DIR/writer.lock                held (flock) by the one writer while it builds the next snapshot

The writer copies the current snapshot to `DIR/snapshots/.building-*`, applies its update there,
flushes it to stable storage (fsync), renames it to the next `snap-N.db`, then writes `CURRENT.tmp`,
fsyncs it and renames it over `CURRENT` (rename is atomic in POSIX and on NFS, where it is one
RENAME call), and fsyncs the directory. A writer killed at any point leaves `CURRENT` naming the
previous complete snapshot (the half-built file is removed by a later writer). Readers open the
named file with `mode=ro&immutable=1` (no lock, no journal, no `-wal`/`-shm` on the shared volume)
and read `CURRENT` again at the start of each request: they switch between requests, never
during one. A snapshot is deleted once its successor has been current for `grace_s` seconds, so a
reader on another machine that has not yet looked again never finds its file gone.

Whoever can write the shared volume is not trusted with the files of the hosts that use it: the
pointer, the snapshots folder and a snapshot are never followed through a symbolic link (a reader
would open, and the writer copy onto the volume, a host file; a planted `CURRENT.tmp` link would
have the writer overwrite one), and a pointer that names no snapshot is not quoted back. Nor is
a snapshot's schema trusted: views and triggers planted in one cannot call functions
(`_untrusted_schema`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import sqlite3
import stat
import time
import uuid
from pathlib import Path

from ..paths import fsync_dir

log = logging.getLogger("codemoat.index")
POINTER = "CURRENT"
_SNAP = re.compile(r"^snap-(\d{6,})\.db$")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _refuse(msg: str) -> Exception:
    from ..errors import CodemoatError

    return CodemoatError(msg)


def grace_s() -> float:
    """The setting `retrieval.index_snapshot_grace_s` (ten minutes by default: readers look at the pointer on every request)."""
    from ..config import load_settings

    return load_settings().retrieval.index_snapshot_grace_s


class SnapshotDir:
    """A directory of index snapshots: which one is current, reading it, publishing the next."""

    def __init__(self, root: Path):
        self.root = root
        self.snaps = root / "snapshots"

    def current(self) -> Path | None:
        """The current snapshot (None before the first publish)."""
        name = self.pointer()
        if name is None:
            return None
        if not _SNAP.match(name):  # its content is not quoted: it may be a host file's
            raise _refuse(f"the index pointer {self.root / POINTER} names no snapshot (snap-NNNNNN.db)")
        self._check_folder()
        path = self.snaps / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise _refuse(f"the index pointer {self.root / POINTER} names {name}, which is missing") from None
        if not stat.S_ISREG(mode):
            raise _refuse(f"index snapshot {path} is not a regular file (a link or a folder): refused")
        return path

    def _check_folder(self) -> None:
        try:
            mode = os.lstat(self.snaps).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(mode):
            raise _refuse(f"{self.snaps} is not a folder (a link or a file): the index snapshots are refused")

    def pointer(self) -> str | None:
        """What `CURRENT` says now: one small read (its name, not its inode, which a filesystem may reuse)."""
        try:
            fd = os.open(self.root / POINTER, os.O_RDONLY | _NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:  # ELOOP: a symbolic link
            raise _refuse(f"the index pointer {self.root / POINTER} is not a regular file ({e.strerror}): refused") from None
        with open(fd, encoding="ascii", errors="replace") as f:
            return f.read(256).strip()

    @staticmethod
    def open_reader(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, isolation_level=None, check_same_thread=False)
        return _untrusted_schema(conn)

    def begin(self) -> Building:
        """Take the writer lock and start the next snapshot from a copy of the current one."""
        self._check_folder()
        self.snaps.mkdir(parents=True, exist_ok=True)
        self._check_folder()
        try:
            lock = os.open(self.root / "writer.lock", os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
        except OSError as e:
            raise _refuse(f"cannot open {self.root / 'writer.lock'}: {e.strerror}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cur = self.current()
            tmp = self.snaps / f".building-{uuid.uuid4().hex}.db"
            # 0600 from the start (it holds the customer's code, like index.db), then the copy
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as dst:
                if cur is not None:
                    with open(os.open(cur, os.O_RDONLY | _NOFOLLOW), "rb") as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
            return Building(self, lock, tmp, _number(cur) if cur else 0)
        except BaseException:
            os.close(lock)
            raise

    def collect(self, now: float | None = None) -> list[str]:
        """Delete snapshots whose successor has been published for over the grace period, and
        half-built files older than it; returns the names deleted.

        Ages are measured on the file server's clock (the pointer's mtime, written at the publish
        that calls this, against the files' mtimes), not the writer's: a writer whose clock runs
        ahead of the volume's would otherwise delete a snapshot readers elsewhere still use."""
        if now is None:
            try:
                now = os.stat(self.root / POINTER).st_mtime
            except FileNotFoundError:
                now = time.time()
        cur = self.current()
        names = sorted((n for n in os.listdir(self.snaps) if _SNAP.match(n)), key=lambda n: int(_SNAP.match(n)[1]))
        gone = []
        for old, succ in zip(names, names[1:]):
            if cur is not None and self.snaps / old == cur:
                continue
            try:
                if now - os.stat(self.snaps / succ).st_mtime >= grace_s():
                    os.unlink(self.snaps / old)
                    gone.append(old)
            except FileNotFoundError:
                pass
        for n in os.listdir(self.snaps):
            p = self.snaps / n
            if n.startswith(".building-"):
                try:
                    if now - os.stat(p).st_mtime >= grace_s():
                        os.unlink(p)
                        gone.append(n)
                except FileNotFoundError:
                    pass
        return gone


class Building:
    """The next snapshot while the writer fills it; `publish()` makes it current, `abandon()` drops it."""

    def __init__(self, snapdir: SnapshotDir, lock_fd: int, path: Path, after: int):
        self.dir, self._lock, self.path, self.after = snapdir, lock_fd, path, after

    def connect(self) -> sqlite3.Connection:
        conn = _untrusted_schema(sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30))
        # a private file until it is published: no journal needed to survive a crash (it is thrown away)
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def publish(self) -> Path:
        try:
            _fsync(self.path)
            final = self.dir.snaps / f"snap-{self.after + 1:06d}.db"
            os.rename(self.path, final)
            fsync_dir(self.dir.snaps)
            tmp = self.dir.root / f"{POINTER}.tmp"
            tmp.unlink(missing_ok=True)  # a link planted there is removed, never written through
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
            try:
                os.write(fd, final.name.encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.dir.root / POINTER)
            fsync_dir(self.dir.root)
            try:
                self.dir.collect()
            except (OSError, ValueError) as e:  # published all the same; the next writer collects
                log.warning("index snapshots in %s were not collected: %s", self.dir.snaps, e)
            return final
        finally:
            os.close(self._lock)

    def abandon(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._lock)


def _untrusted_schema(conn: sqlite3.Connection) -> sqlite3.Connection:
    """A snapshot came from a shared volume: its schema may have been crafted there.

    `trusted_schema=OFF`: views and triggers in the file cannot call functions or virtual tables
    that are not marked innocuous (json_each, pragma_* tables, FTS5 tables, any function an
    application registers); the index's own schema has neither views nor triggers, and its
    queries name its tables directly. `cell_size_check=ON`: a malformed page is reported as
    corruption instead of being read (https://sqlite.org/security.html, "untrusted database files")."""
    conn.execute("PRAGMA trusted_schema=OFF")
    conn.execute("PRAGMA cell_size_check=ON")
    return conn


def _number(path: Path) -> int:
    m = _SNAP.match(path.name)
    return int(m[1]) if m else 0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
