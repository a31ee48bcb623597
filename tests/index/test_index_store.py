"""Storage and incremental update: hashes, deletions, transactions, readers during writes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError, NotFound
from codemoat.index.store import SqliteIndex
from codemoat.index.update import add_repository, update_repository

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _repo(tmp_path: Path, n: int = 6) -> Path:
    """tmp_path/repo with `n` small Python modules."""
    root = tmp_path / "repo"
    root.mkdir()
    for i in range(n):
        (root / f"mod{i}.py").write_text(
            f"def func_{i}(x):\n    return x + {i}\n\nclass Thing{i}:\n    def run(self):\n        return {i}\n"
        )
    return root


def _snapshot(store: SqliteIndex) -> list:
    db = store.db
    return [db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in ("files", "chunks", "symbols")] + [
        db.execute("SELECT rowid, terms FROM chunks_fts ORDER BY rowid").fetchall()
    ]


def test_add_update_only_changed_files_and_deletions(tmp_path):
    root = _repo(tmp_path)
    store = SqliteIndex(tmp_path / "index.db")
    s = add_repository(store, root, "r", ["dev"])
    assert (s.indexed, s.files) == (6, 6) and s.symbols == 6 * 3
    rid = store.repo("r").id
    assert store.lookup_symbols(["func_3"], [rid])[0].path == "mod3.py"

    (root / "mod3.py").write_text("def renamed_three(y):\n    return y\n")
    (root / "mod5.py").unlink()
    s = update_repository(store, "r")
    assert (s.indexed, s.unchanged, s.removed) == (1, 4, 1)
    assert store.lookup_symbols(["func_3", "func_5", "Thing5"], [rid]) == []
    assert store.lookup_symbols(["renamed_three"], [rid])[0].path == "mod3.py"
    assert not [r for r in store.search(["func_5"], [rid], 10)]
    assert store.search(["renamed_three"], [rid], 10)
    s = update_repository(store, "r")
    assert (s.indexed, s.unchanged, s.removed) == (0, 5, 0)


def test_doc_freq_counts_chunks_per_term(tmp_path):
    root = _repo(tmp_path, 3)
    store = SqliteIndex(tmp_path / "index.db")
    add_repository(store, root, "r", ["dev"])
    df = store.doc_freq(["func_1", "run", "absent"])
    assert df["func_1"] == 1 and df["run"] == 6 and "absent" not in df  # `run`: 3 class skeletons, 3 methods
    assert store.doc_freq([]) == {}


def test_interrupted_update_leaves_previous_index_intact(tmp_path):
    root = _repo(tmp_path, 8)
    db = tmp_path / "index.db"
    add_repository(SqliteIndex(db), root, "r", ["dev"])
    before = _snapshot(SqliteIndex(db))
    for i in range(8):
        (root / f"mod{i}.py").write_text(f"def changed_{i}():\n    pass\n")
    # A process killed (no cleanup at all) half-way through an update:
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {SRC!r})
        from codemoat.index.store import SqliteIndex
        from codemoat.index.update import update_repository
        def progress(done, total, path):
            if done == 5:
                os._exit(9)
        update_repository(SqliteIndex({str(db)!r}), "r", progress)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    assert _snapshot(SqliteIndex(db)) == before
    # And interrupted in-process (Ctrl-C):
    store = SqliteIndex(db)

    def interrupt(done, total, path):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        update_repository(store, "r", interrupt)
    assert _snapshot(store) == before
    # A complete run then applies every change.
    assert update_repository(store, "r").indexed == 8
    assert _snapshot(store) != before


def test_readers_see_previous_index_until_commit(tmp_path):
    root = _repo(tmp_path, 2)
    db = tmp_path / "index.db"
    writer = SqliteIndex(db)
    add_repository(writer, root, "r", ["dev"])
    rid = writer.repo("r").id
    reader = SqliteIndex(db)
    with writer.transaction():
        fid, _ = writer.file_hashes(rid)["mod0.py"]
        writer.delete_file(fid)
        assert reader.lookup_symbols(["func_0"], [rid])  # not yet committed: still visible
    assert reader.lookup_symbols(["func_0"], [rid]) == []


def test_remove_repository_leaves_nothing(tmp_path):
    root = _repo(tmp_path, 2)
    store = SqliteIndex(tmp_path / "index.db")
    add_repository(store, root, "r", ["dev"])
    store.remove_repo("r")
    assert all(rows == [] for rows in _snapshot(store))
    with pytest.raises(NotFound):
        store.repo("r")


def test_user_errors_are_one_line(tmp_path):
    root = _repo(tmp_path, 1)
    store = SqliteIndex(tmp_path / "index.db")
    with pytest.raises(CodemoatError, match="at least one group"):
        add_repository(store, root, "r", [])
    with pytest.raises(CodemoatError, match="invalid group"):
        add_repository(store, root, "r", ["bad group!"])
    with pytest.raises(CodemoatError, match="not a folder"):
        add_repository(store, tmp_path / "missing", "r", ["dev"])
    add_repository(store, root, "r", ["dev"])
    with pytest.raises(CodemoatError, match="already indexed"):
        add_repository(store, root, "r", ["dev"])
    os.rename(root, tmp_path / "moved")
    with pytest.raises(CodemoatError, match="is gone"):
        update_repository(store, "r")
