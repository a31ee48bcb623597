"""Where codemoat keeps its state: `$CODEMOAT_HOME` (default `~/.codemoat`) for every command.

The folder holds the machine key, the databases (indexed code, token hashes, the audit log) and
logs, so it is private to the account that runs codemoat: created 0700, an existing one with
group or other bits is set back to 0700 (and its files to 0600), and one owned by another account
is refused with a one-line reason. The process's umask becomes 077 at the same moment, so every
file codemoat creates afterwards — SQLite's -wal and -shm, head files, caches, logs — is 0600
from its first byte, whichever library creates it.

A file a user names (a license, a CRL, a config, a key) is read with `read_regular`: only a regular
file, up to a limit per kind, so a FIFO or /dev/zero named on the command line is refused in one line.
A file codemoat writes in this folder itself is read back with `read_own`: the same, and never through
a symbolic link.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600
_checked: set[Path] = set()


def home() -> Path:
    """The data directory, private to this account (0700, files 0600); checked once per process."""
    from .errors import CodemoatError

    env = os.environ.get("CODEMOAT_HOME")
    root = Path(env or Path.home() / ".codemoat").expanduser()
    what = "CODEMOAT_HOME" if env else "the data folder (set CODEMOAT_HOME to use another)"
    os.umask(0o077)
    if root in _checked:
        return root
    try:
        root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    except FileExistsError:
        raise CodemoatError(f"{what} must be a folder: {root} exists and is not one") from None
    except NotADirectoryError:
        raise CodemoatError(f"{what} must be a folder: part of the path {root} is a file") from None
    except OSError as e:
        raise CodemoatError(f"cannot create {what} {root}: {e.strerror or e}") from None
    make_private(root, what)
    _checked.add(root)
    return root


def outbound_log() -> Path:
    """`outbound.jsonl`: every request this machine sends off it (vault.lease writes it, audit.outbound reads it)."""
    return home() / "outbound.jsonl"


def make_private(root: Path, what: str = "the data folder") -> None:
    """Refuse a folder another account owns; set it to 0700 and the files in it to 0600."""
    from .errors import CodemoatError

    st = root.stat()
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise CodemoatError(
            f"{what} {root} belongs to another account (uid {st.st_uid}); codemoat keeps its "
            f"keys and databases only in a folder it owns (mode 700)"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        try:
            os.chmod(root, PRIVATE_DIR)
        except OSError as e:
            raise CodemoatError(
                f"{what} {root} is open to other users (mode {stat.S_IMODE(st.st_mode):o}) and "
                f"cannot be made private: {e.strerror or e}"
            ) from None
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for e in entries:
        try:
            if e.is_file(follow_symlinks=False) and stat.S_IMODE(e.stat(follow_symlinks=False).st_mode) & 0o077:
                os.chmod(e.path, PRIVATE_FILE)
        except OSError:
            pass


SQLITE_HEADER = b"SQLite format 3\x00"


class NotSQLite(ValueError):
    """A file at a SQLite database's path that is not empty and not SQLite (some other file named by mistake)."""


def fsync_dir(path: Path) -> None:
    """A folder's entries made durable (a rename or a new file in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_sqlite(path: Path) -> Path:
    """`private_file` for a SQLite database (0600 before SQLite opens it: its -wal and -shm copy the mode), but a
    file there that is neither empty nor SQLite is refused first (`NotSQLite`), its mode untouched: a setting
    naming /etc/passwd by mistake must not take other users' read access away."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError:
        head = b""  # missing (created below), or opening it will say what is wrong
    if head and head != SQLITE_HEADER:
        raise NotSQLite(f"{path} is not a SQLite file")
    return private_file(path)


def private_file(path: Path) -> Path:
    """Create `path` 0600 if it is missing, or take group and other bits off an existing one we own."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), PRIVATE_FILE))
        if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
            os.chmod(path, PRIVATE_FILE)
    except OSError:
        pass  # opening it will say what is wrong, in the caller's words
    return path


def db_url() -> str:
    """The customer database: `CODEMOAT_DATABASE_URL`, else the URL in the file named by
    `CODEMOAT_DATABASE_URL_FILE` (a mounted secret: the password stays out of the environment),
    else SQLite under the data directory."""
    from .errors import CodemoatError

    url = os.environ.get("CODEMOAT_DATABASE_URL")
    if url:
        return url
    secret = os.environ.get("CODEMOAT_DATABASE_URL_FILE")
    if secret:
        url = read_secret(secret, "CODEMOAT_DATABASE_URL_FILE")
        if not url:
            raise CodemoatError(f"CODEMOAT_DATABASE_URL_FILE {secret} is empty: it must hold the database URL")
        return url
    return f"sqlite:///{home() / 'codemoat.db'}"


def read_secret(file: str | Path, what: str) -> str:
    """The text of a secret held in a file (a mounted secret: never the config or the environment),
    stripped; one line naming `what` (the setting that points at it) when it cannot be read."""
    from .errors import CodemoatError

    if not os.path.exists(file):
        raise CodemoatError(f"{what} {file}: cannot read it (no such file)")
    try:  # a FIFO or device named as the secret is refused, not read for good
        return read_regular(file, what, 1 << 20).decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise CodemoatError(f"{what} {file}: cannot read it ({e})") from None


def bundled_model() -> Path:
    """The model that ships with the repository (see models/README.md)."""
    return Path(__file__).resolve().parents[2] / "models" / "codemoat-tiny.gguf"


def open_regular(
    path: str | Path, what: str, error: type[Exception] | None = None, *, own: bool = False
) -> tuple[int, os.stat_result]:
    """A descriptor open for reading on `path` and its fstat, only when it is a regular file; else
    `error` (default CodemoatError) in one line naming `what` and the path. Opened with O_NONBLOCK, so
    a FIFO (a hostile USB stick) is refused instead of blocking the open for good; a device such as
    /dev/zero is refused too. The caller closes the descriptor. `own`: a file codemoat writes in its
    own home (see read_own): never opened through a symbolic link, and FileNotFoundError passes."""
    from .errors import CodemoatError

    err = error or CodemoatError
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (os.O_NOFOLLOW if own else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if own:
            raise
        raise err(f"{what} not found: {path}") from None
    except OSError as e:
        if own and e.errno == errno.ELOOP:
            raise err(f"{path} is a symbolic link, not a {what}") from None
        raise err(f"cannot read {what} {path}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise err(f"{path} is {'a folder' if stat.S_ISDIR(st.st_mode) else 'not a regular file'}, not a {what}")
    return fd, st


def read_regular(
    path: str | Path, what: str, limit: int | None, error: type[Exception] | None = None, *, own: bool = False
) -> bytes:
    """The bytes of the regular file `path` (see open_regular), at most `limit` of them: a larger file
    is refused in one line rather than read whole into memory. `limit` None: the whole file (a vendor's
    adapter or knowledge pack, large by design)."""
    from .errors import CodemoatError

    fd, st = open_regular(path, what, error, own=own)
    with os.fdopen(fd, "rb") as f:
        if limit is None:
            return f.read()
        data = b"" if st.st_size > limit else f.read(limit + 1)
    if st.st_size > limit or len(data) > limit:
        size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit >> 10} KiB" if limit >= 1 << 10 else f"{limit} bytes"
        raise (error or CodemoatError)(f"{what} {path} is larger than {size}: not a {what}")
    return data


def read_own(path: str | Path, what: str, limit: int | None = 1 << 20, error: type[Exception] | None = None) -> bytes:
    """A file codemoat writes in its own home (clock.json, machine.key, tpm.json, the update store's
    state, an installed CRL, ...): a regular file, not a symbolic link (O_NOFOLLOW), at most `limit`
    bytes; else one line. A FIFO put there no longer hangs the reader, and a link no longer redirects
    it to a file elsewhere. FileNotFoundError passes: a missing file means what it meant before."""
    return read_regular(path, what, limit, error, own=True)


def open_own(path: str | Path, what: str, flags: int = os.O_RDWR | os.O_CREAT, error: type[Exception] | None = None) -> int:
    """A descriptor on a file codemoat keeps in its own home or vendor folder (a lock file, a secret it
    writes), created 0600: never through a symbolic link (O_NOFOLLOW), and only a regular file
    (O_NONBLOCK: a FIFO put there is refused instead of blocking the open for good); else one line."""
    from .errors import CodemoatError

    err = error or CodemoatError
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), PRIVATE_FILE)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise err(f"{path} is a symbolic link, not a {what}") from None
        if e.errno == errno.ENXIO:  # a FIFO opened for writing alone, with no reader
            raise err(f"{path} is not a regular file, not a {what}") from None
        raise err(f"cannot open {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise err(f"{path} is not a regular file, not a {what}")
    return fd


def write_out(path: str | Path, data: bytes | memoryview, *, force: bool) -> None:
    """Write a file the user named (`--out`) whole, as `open_out` does. An OSError passes (FileExistsError: the
    file appeared since the caller's check)."""
    with open_out(path, force=force, text=False) as f:
        f.write(data)


@contextmanager
def open_out(path: str | Path, *, force: bool, text: bool = True) -> Iterator[IO]:
    """A file the user named (`--out`), to write: without `force` only as a new file (O_CREAT|O_EXCL|O_NOFOLLOW,
    so a file or symbolic link put there after the caller's check is refused, not truncated or written
    through); with it through a temporary file in the same folder and os.replace, so a link there is replaced,
    not followed, and what was there stays whole until the new file is. Work that fails part way leaves no
    file behind (the new one is removed; a replaced one is untouched). An OSError passes."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if force else path
    fd = os.open(target, flags, 0o666)  # the umask decides, as for any file the user asks for
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") if text else os.fdopen(fd, "wb") as f:
            yield f
        if force:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
