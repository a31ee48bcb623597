"""An index published as snapshots on a "shared volume" (a folder under tmp_path), with one small
repository in it: what the snapshot attack tests start from."""

from __future__ import annotations

from pathlib import Path

from codemoat.index.store import SqliteIndex
from codemoat.index.update import add_repository


def small_repo(root: Path, name: str) -> Path:
    """A repository folder `root/name` with one Python file (its docstring: INDEXED_MARKER)."""
    repo = root / name
    repo.mkdir()
    (repo / "mod.py").write_text('def helper():\n    """INDEXED_MARKER"""\n    return 1\n')
    return repo


def shared_volume(tmp_path: Path, group: str) -> Path:
    """The index folder on the volume, "payments" indexed in it for `group` (snapshot 1 published)."""
    d = tmp_path / "shared-volume" / "index"
    d.mkdir(parents=True)
    add_repository(SqliteIndex(d), small_repo(tmp_path, "payments"), "payments", [group])
    return d
