"""Reading a file strictly inside a repository's folder, whatever its listing says.

Nothing outside the repository's root is ever read (`git ls-files` lists committed symlinks as
files). A path is opened one component at a time from a descriptor of the
root (`openat` with `O_NOFOLLOW`), so a symlink anywhere on the way is refused, not followed — to a
file or a folder, outside the root or inside it (a link that stays inside is skipped: its target
is indexed once, under the target's own path). `..` components, device files, FIFOs and sockets,
folders on another filesystem (a mount inside the repository) and folders of another indexed
repository, or codemoat's own data folder, are refused too; those folders also by what is opened (device
and inode: for the data folder the root, its parents and every folder on the way; for another
repository the root and every folder on the way), not only by path, since the recorded path of a
repository can lead elsewhere once someone swaps one of its parents for a link. The opened descriptor's device and inode must equal those of the
entry checked just before, so a file swapped for a link between check and open is refused. A hard
link is the file itself by every path, so it cannot be told from a file that belongs here: any
file with more than one link is refused ("hard link"); git never creates hard links in a work tree.
`RepoReader.read` says why it refused; `index add|update` name the refused paths in their summary.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from ..errors import CodemoatError

MAX_BYTES = 1_000_000  # larger files are not read (None)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_UP_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a device file"),
    (stat.S_ISBLK, "a device file"),
)


class Refused(str):
    """Why a path was not read (a symlink, `..`, a device…); it is never opened. `folder`: the
    repository-relative folder refused as a whole (another repository, the data folder), if any."""

    folder: str | None = None

    @classmethod
    def whole(cls, text: str, folder: str) -> Refused:
        r = cls(text)
        r.folder = folder
        return r


FOLDER = Refused("a folder")  # a submodule or nested repository listed by git: not a file, not reported
GONE = Refused("no longer there")  # tracked by git but deleted from the work tree: not reported


class TooLarge(Exception):
    pass


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


class RepoReader:
    """Reads files strictly inside one root, from a descriptor of it; use as a context manager.

    `read(rel)` returns the bytes, `None` for a file over MAX_BYTES or gone, or a `Refused` reason."""

    def __init__(self, root: Path, other_roots: Sequence[Path] = (), private: Sequence[Path] = ()):
        self.root = Path(root)
        try:
            self._fd = os.open(self.root, _DIR_FLAGS)
        except OSError as e:
            raise CodemoatError(
                f"cannot open repository folder {root}: {e.strerror or e} (a symlinked root is not followed: index its target)"
            ) from None
        self._dev = os.fstat(self._fd).st_dev
        # Only repositories inside this one: their files belong to their own groups, not to ours.
        self._others = [Path(o) for o in other_roots if self.root in Path(o).parents]
        # Folders never read from any repository: codemoat's own data (machine key, databases).
        self._private = [Path(p) for p in private if self.root in Path(p).parents]
        self._private_ids = _ids(private)
        self._other_ids = _ids(other_roots)
        st = os.fstat(self._fd)
        self.root_id = (st.st_dev, st.st_ino)  # what was opened: `index update` compares it with what was added
        other = self._other_ids.get((st.st_dev, st.st_ino))
        if other is not None:
            self.close()
            raise CodemoatError(
                f"repository folder {root} is already indexed as another repository (`codemoat index list`)"
                if Path(other) == self.root
                else f"repository folder {root} is another indexed repository's folder {other} (a link on its path leads there)"
            )
        held = self._holding_private()
        if held is not None:
            self.close()
            raise CodemoatError(
                f"repository folder {root} is inside codemoat's data folder {held} (a link on its path leads there): "
                "it holds the machine key and databases, never a repository"
            )

    def _holding_private(self) -> Path | None:
        """The data folder that is the opened root or one of its parents, by device and inode (None: neither)."""
        fd = os.dup(self._fd)
        try:
            while True:
                st = os.fstat(fd)
                found = self._private_ids.get((st.st_dev, st.st_ino))
                if found is not None:
                    return found
                up = os.open("..", _UP_FLAGS, dir_fd=fd)
                ust = os.fstat(up)
                os.close(fd)
                fd = up
                if (ust.st_dev, ust.st_ino) == (st.st_dev, st.st_ino):  # "/"
                    return None
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RepoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _inside_other(self, rel: str) -> Path | None:
        full = self.root / rel
        return next((o for o in self._others if full == o or o in full.parents), None)

    def _parent(self, parts: list[str]) -> int | Refused:
        """A descriptor of the folder holding the last part (the caller closes it), or why not."""
        fd = os.dup(self._fd)
        for i, part in enumerate(parts[:-1]):
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                os.close(fd)
                where = "/".join(parts[: i + 1])
                if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    return Refused(f"{where} is a symlink or not a folder (never followed)")
                return GONE if e.errno == errno.ENOENT else Refused(f"{where}: {e.strerror}")
            os.close(fd)
            fd = nfd
            st = os.fstat(fd)
            if st.st_dev != self._dev:
                os.close(fd)
                return Refused(f"{'/'.join(parts[: i + 1])} is another filesystem (a mount inside the repository)")
            if (st.st_dev, st.st_ino) in self._private_ids:
                os.close(fd)
                return Refused.whole("codemoat's data folder (never indexed)", "/".join(parts[: i + 1]))
            other = self._other_ids.get((st.st_dev, st.st_ino))
            if other is not None:
                os.close(fd)
                return Refused.whole(f"another indexed repository ({other})", "/".join(parts[: i + 1]))
        return fd

    def check(self, rel: str) -> Refused | None:
        """Why `rel` may not be read (by its path and its entry's type), or None."""
        got = self._lstat(rel)
        if isinstance(got, Refused):
            return got
        os.close(got[0])  # the folder's descriptor `_lstat` opened: one per file checked otherwise
        return None

    def _lstat(self, rel: str) -> tuple[int, os.stat_result] | Refused:
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            return Refused("path has '..', '.' or empty components, or is absolute")
        full = self.root / rel
        for p in self._private:
            if full == p or p in full.parents:
                return Refused.whole("codemoat's data folder (never indexed)", p.relative_to(self.root).as_posix())
        other = self._inside_other(rel)
        if other is not None:
            return Refused.whole(f"another indexed repository ({other})", other.relative_to(self.root).as_posix())
        fd = self._parent(parts)
        if isinstance(fd, Refused):
            return fd
        try:
            st = os.lstat(parts[-1], dir_fd=fd)
        except OSError as e:
            os.close(fd)
            return GONE if e.errno == errno.ENOENT else Refused(f"cannot stat: {e.strerror}")
        why = _refuse_entry(self.root, rel, st)
        if why is not None:
            os.close(fd)
            return why
        return fd, st

    def read(self, rel: str) -> bytes | Refused | None:
        got = self._lstat(rel)
        if isinstance(got, Refused):
            return got
        fd, st = got
        try:
            if st.st_size > MAX_BYTES:
                return None
            try:
                ffd = os.open(rel.rsplit("/", 1)[-1], _FILE_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    return Refused("became a symlink while being indexed (never followed)")
                return None
        finally:
            os.close(fd)
        try:
            fst = os.fstat(ffd)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
                return Refused("was replaced while being indexed")
            if fst.st_nlink > 1:
                return Refused(f"hard link ({fst.st_nlink} links: it may be a file outside the repository)")
            return _read_fd(ffd)
        except TooLarge:
            return None
        finally:
            os.close(ffd)


def _ids(folders: Sequence[Path]) -> dict[tuple[int, int], Path]:
    """(device, inode) -> folder, for the folders that exist."""
    out = {}
    for p in folders:
        try:
            st = os.stat(p)
        except OSError:
            continue
        out[(st.st_dev, st.st_ino)] = Path(p)
    return out


def _refuse_entry(root: Path, rel: str, st: os.stat_result) -> Refused | None:
    if stat.S_ISLNK(st.st_mode):
        try:
            target = (root / rel).resolve()
        except (OSError, RuntimeError):
            return Refused("symlink (never followed)")
        if target == root or root in target.parents:
            return Refused("symlink inside the repository (never followed; its target is indexed under its own path)")
        return Refused("symlink to outside the repository (never followed)")
    if stat.S_ISDIR(st.st_mode):
        return FOLDER
    if not stat.S_ISREG(st.st_mode):
        return Refused(_kind(st.st_mode))
    if st.st_nlink > 1:
        return Refused(f"hard link ({st.st_nlink} links: it may be a file outside the repository)")
    return None


def _read_fd(fd: int) -> bytes:
    out, size = [], 0
    while True:
        block = os.read(fd, 1 << 20)
        if not block:
            return b"".join(out)
        size += len(block)
        if size > MAX_BYTES:
            raise TooLarge
        out.append(block)


def read_bytes(path: Path) -> bytes | None:
    """The bytes of a regular file no larger than MAX_BYTES, else None (its last component is
    never followed if a symlink; `RepoReader` checks every component against a root)."""
    path = Path(path)
    try:
        with RepoReader(path.parent) as r:
            got = r.read(path.name)
    except (OSError, ValueError, CodemoatError):
        return None
    return None if isinstance(got, Refused) else got
