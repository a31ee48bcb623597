"""Where codemoat keeps its state: `$CODEMOAT_HOME` (default `~/.codemoat`) for every command.

The folder holds the machine key, the databases (indexed code, token hashes, the audit log) and
logs, so it is private to the account that runs codemoat: created 0700, an existing one with
group or other bits is set back to 0700 (and its files to 0600), and one owned by another account
is refused with a one-line reason. The process's umask becomes 077 at the same moment, so every
file codemoat creates afterwards — SQLite's -wal and -shm, head files, caches, logs — is 0600
from its first byte, whichever library creates it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

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

    try:
        return Path(file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CodemoatError(f"{what} {file}: cannot read it ({getattr(e, 'strerror', None) or e})") from None


def bundled_model() -> Path:
    """The model that ships with the repository (see models/README.md)."""
    return Path(__file__).resolve().parents[2] / "models" / "codemoat-tiny.gguf"
