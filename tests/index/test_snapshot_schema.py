"""A snapshot's schema planted on the shared volume (by someone who can write the volume, not the
hosts): its views and triggers cannot make a replica or the writer call functions or virtual
tables (`PRAGMA trusted_schema=OFF` on every snapshot connection); an honest snapshot reads as before."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from codemoat.index.snapshots import POINTER, SnapshotDir
from codemoat.index.store import SqliteIndex
from codemoat.index.update import add_repository
from snaphelp import shared_volume, small_repo


@pytest.fixture
def volume(tmp_path):
    return shared_volume(tmp_path, "team-pay")


def _plant(volume: Path, script: str) -> None:
    """A next snapshot with `script` applied to a copy of the current one, published by hand."""
    nxt = volume / "snapshots" / "snap-000002.db"
    shutil.copy(SnapshotDir(volume).current(), nxt)
    c = sqlite3.connect(nxt)
    c.executescript(script)
    c.commit()
    c.close()
    (volume / POINTER).write_text(nxt.name + "\n")


def test_an_honest_snapshot_reads_as_before(volume):
    r = SqliteIndex(volume)
    assert [(x.name, x.groups) for x in r.repos()] == [("payments", ("team-pay",))]
    conn = SnapshotDir.open_reader(SnapshotDir(volume).current())
    assert conn.execute("PRAGMA trusted_schema").fetchone()[0] == 0


def test_a_planted_view_cannot_call_functions_or_virtual_tables(volume):
    # every repository readable by everyone, and the reader's own file name shown as a group,
    # through a table-valued function and a pragma table called from a view
    _plant(
        volume,
        "ALTER TABLE repo_groups RENAME TO rg;"
        "CREATE VIEW repo_groups AS SELECT r.id AS repo_id, j.value AS grp FROM repos r, "
        "json_each(json_array('everyone', (SELECT file FROM pragma_database_list LIMIT 1))) j;",
    )
    reader = SqliteIndex(volume)
    with pytest.raises(sqlite3.DatabaseError, match="unsafe use"):
        reader.repos()


def test_a_planted_trigger_cannot_call_functions_in_the_writer(volume, tmp_path):
    _plant(
        volume,
        "CREATE TRIGGER widen AFTER INSERT ON repos BEGIN "
        "INSERT INTO repo_groups VALUES (NEW.id, json_extract('[\"everyone\"]', '$[0]')); END;",
    )
    with pytest.raises(sqlite3.DatabaseError, match="unsafe use"):
        add_repository(SqliteIndex(volume), small_repo(tmp_path, "billing"), "billing", ["team-bill"])
    assert (volume / POINTER).read_text().strip() == "snap-000002.db"  # nothing published over it
    names = {x.name: x.groups for x in SqliteIndex(volume).repos()}
    assert "billing" not in names
