"""Where codemoat keeps its state: `$CODEMOAT_HOME` (default `~/.codemoat`) for every command."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The data directory, created with mode 0700 on first use."""
    root = Path(os.environ.get("CODEMOAT_HOME") or Path.home() / ".codemoat").expanduser()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


def db_url() -> str:
    """The customer database: `CODEMOAT_DATABASE_URL`, else SQLite under the data directory."""
    return os.environ.get("CODEMOAT_DATABASE_URL") or f"sqlite:///{home() / 'codemoat.db'}"


def bundled_model() -> Path:
    """The model that ships with the repository (see models/README.md)."""
    return Path(__file__).resolve().parents[2] / "models" / "codemoat-tiny.gguf"
