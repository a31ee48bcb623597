"""Where codemoat keeps its state: `$CODEMOAT_HOME` (default `~/.codemoat`) for every command."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The data directory, created with mode 0700 on first use."""
    from .errors import CodemoatError

    env = os.environ.get("CODEMOAT_HOME")
    root = Path(env or Path.home() / ".codemoat").expanduser()
    what = "CODEMOAT_HOME" if env else "the data folder (set CODEMOAT_HOME to use another)"
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise CodemoatError(f"{what} must be a folder: {root} exists and is not one") from None
    except NotADirectoryError:
        raise CodemoatError(f"{what} must be a folder: part of the path {root} is a file") from None
    except OSError as e:
        raise CodemoatError(f"cannot create {what} {root}: {e.strerror or e}") from None
    return root


def db_url() -> str:
    """The customer database: `CODEMOAT_DATABASE_URL`, else SQLite under the data directory."""
    return os.environ.get("CODEMOAT_DATABASE_URL") or f"sqlite:///{home() / 'codemoat.db'}"


def bundled_model() -> Path:
    """The model that ships with the repository (see models/README.md)."""
    return Path(__file__).resolve().parents[2] / "models" / "codemoat-tiny.gguf"
