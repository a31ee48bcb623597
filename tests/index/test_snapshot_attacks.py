"""Attacks on the index snapshot directory by someone who can write the shared volume (a pod that
mounts it read-write, root on any NFS client) but not the files of the hosts that use it: symbolic
links planted for the pointer, a snapshot, the pointer's temporary file or the snapshots folder
must not make a reader show, or the writer copy or overwrite, a file outside the volume."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError
from codemoat.index.snapshots import POINTER, SnapshotDir
from codemoat.index.store import SqliteIndex
from codemoat.index.update import add_repository
from snaphelp import shared_volume, small_repo

SECRET = "hunter2-private-key-material"


@pytest.fixture
def volume(tmp_path):
    return shared_volume(tmp_path, "everyone")


@pytest.fixture
def host_db(tmp_path) -> Path:
    """A private SQLite file on the host that runs the writer (or a replica): accounts, tokens."""
    p = tmp_path / "host-home" / "codemoat.db"
    p.parent.mkdir()
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE tokens (hash TEXT)")
    c.execute("INSERT INTO tokens VALUES (?)", (SECRET,))
    c.commit()
    c.close()
    return p


def _volume_bytes(d: Path) -> bytes:
    out = b""
    for root, _, files in os.walk(d):
        for n in files:
            p = Path(root) / n
            if not p.is_symlink():
                out += p.read_bytes()
    return out


def test_a_pointer_linked_to_a_host_file_is_refused_without_showing_it(volume, tmp_path):
    secret = tmp_path / "host-home" / "machine.key"
    secret.parent.mkdir()
    secret.write_text(SECRET + "\n")
    (volume / POINTER).unlink()
    (volume / POINTER).symlink_to(secret)
    with pytest.raises(CodemoatError) as e:
        SqliteIndex(volume).repos()
    assert "hunter2" not in str(e.value) and "\n" not in str(e.value)


def test_a_snapshot_linked_to_a_host_database_is_neither_read_nor_copied_onto_the_volume(volume, host_db, tmp_path):
    (volume / "snapshots" / "snap-000009.db").symlink_to(host_db)
    (volume / POINTER).write_text("snap-000009.db\n")
    with pytest.raises(CodemoatError, match="not a regular file"):
        SqliteIndex(volume).repos()  # a replica does not open the host's file as the index
    with pytest.raises(CodemoatError, match="not a regular file"):
        add_repository(SqliteIndex(volume), small_repo(tmp_path, "other"), "other", ["everyone"])
    assert SECRET.encode() not in _volume_bytes(volume)  # the writer published no copy of it
    assert sorted(os.listdir(volume / "snapshots")) == ["snap-000001.db", "snap-000009.db"]


def test_a_planted_pointer_tmp_link_does_not_overwrite_a_host_file(volume, tmp_path):
    victim = tmp_path / "host-home" / "audit.db"
    victim.parent.mkdir()
    victim.write_text("precious")
    (volume / f"{POINTER}.tmp").symlink_to(victim)
    add_repository(SqliteIndex(volume), small_repo(tmp_path, "other"), "other", ["everyone"])
    assert victim.read_text() == "precious"
    assert (volume / POINTER).read_text().strip() == "snap-000002.db" and not (volume / POINTER).is_symlink()
    assert {r.name for r in SqliteIndex(volume).repos()} == {"payments", "other"}


def test_a_snapshots_folder_linked_elsewhere_is_refused(tmp_path):
    d = tmp_path / "shared-volume" / "index"
    d.mkdir(parents=True)
    elsewhere = tmp_path / "host-home" / "keys"
    elsewhere.mkdir(parents=True)
    (d / "snapshots").symlink_to(elsewhere)
    with pytest.raises(CodemoatError, match="not a folder"):
        add_repository(SqliteIndex(d), small_repo(tmp_path, "payments"), "payments", ["everyone"])
    assert os.listdir(elsewhere) == []  # nothing written (nor collected) outside the volume


def test_a_reader_in_a_request_keeps_its_snapshot_when_collection_deletes_it(volume, tmp_path, monkeypatch):
    reader = SqliteIndex(volume)
    assert [r.name for r in reader.repos()] == ["payments"]  # a request has opened snap-000001
    monkeypatch.setenv("CODEMOAT_RETRIEVAL__INDEX_SNAPSHOT_GRACE_S", "0")  # collection at once
    add_repository(SqliteIndex(volume), small_repo(tmp_path, "a"), "a", ["everyone"])
    add_repository(SqliteIndex(volume), small_repo(tmp_path, "b"), "b", ["everyone"])
    assert sorted(os.listdir(volume / "snapshots")) == ["snap-000003.db"]  # snap-000001 is gone
    assert [r.name for r in reader.repos()] == ["payments"]  # the open reader still reads it whole
    assert reader.refresh() and {r.name for r in reader.repos()} == {"payments", "a", "b"}


def test_collection_touches_only_snapshot_names(volume):
    other = volume / "snapshots" / "notes.txt"
    other.write_text("kept")
    assert SnapshotDir(volume).collect(now=4e9) == []  # only snap-1 and it is current
    assert other.read_text() == "kept"


def test_a_writer_whose_clock_runs_ahead_of_the_volume_does_not_collect_early(volume, tmp_path, monkeypatch):
    """Snapshot ages are the file server's (mtimes); the writer's own clock an hour ahead of it
    must not delete the snapshot that was current a moment ago, which readers on other machines
    may still have open (on NFS a deleted file is gone for every other client)."""
    import codemoat.index.snapshots as snapshots

    real = snapshots.time.time
    monkeypatch.setattr(snapshots.time, "time", lambda: real() + 3600)
    add_repository(SqliteIndex(volume), small_repo(tmp_path, "other"), "other", ["everyone"])
    assert sorted(os.listdir(volume / "snapshots")) == ["snap-000001.db", "snap-000002.db"]
