"""The index as immutable snapshots behind a pointer (an index path that is a directory, as on a
volume shared by replicas on several machines): an update is published whole or not at all, a
writer killed half-way leaves readers on the previous snapshot, two reader processes switch to the
new one between requests and never see half of it, readers write nothing to the shared volume,
and old snapshots go after a grace period. (No NFS here: this tests the file protocol.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError
from codemoat.index.snapshots import POINTER, SnapshotDir
from codemoat.index.store import SqliteIndex
from codemoat.index.update import add_repository, update_repository

SRC = Path(__file__).resolve().parents[2] / "src"
N = 12


def _write(repo: Path, version: str) -> None:
    for i in range(N):
        (repo / f"mod{i}.py").write_text(f'def helper_{i}():\n    """{version}_MARKER"""\n    return {i}\n')


def _count(store: SqliteIndex, version: str) -> int:
    return store.db.execute("SELECT count(*) FROM chunks WHERE text LIKE ?", (f"%{version}_MARKER%",)).fetchone()[0]


@pytest.fixture
def shared(tmp_path):
    d = tmp_path / "shared-volume" / "index"
    d.mkdir(parents=True)
    repo = tmp_path / "payments"
    repo.mkdir()
    _write(repo, "OLD")
    add_repository(SqliteIndex(d), repo, "payments", ["everyone"])
    return d, repo


def test_update_publishes_a_new_snapshot_and_readers_switch_between_requests(shared):
    d, repo = shared
    assert (d / POINTER).read_text().strip() == "snap-000001.db"
    reader = SqliteIndex(d)
    assert _count(reader, "OLD") == N
    _write(repo, "NEW")
    update_repository(SqliteIndex(d), "payments")
    assert (d / POINTER).read_text().strip() == "snap-000002.db"
    assert _count(reader, "OLD") == N  # the request in progress keeps its snapshot
    assert reader.refresh() and _count(reader, "NEW") == N and _count(reader, "OLD") == 0
    assert not reader.refresh()  # nothing new: one small read, no reopen
    names = sorted(os.listdir(d)) + sorted(os.listdir(d / "snapshots"))
    assert not [n for n in names if n.endswith(("-wal", "-shm", "-journal"))], names  # nothing but whole files
    assert (d / "snapshots" / "snap-000002.db").stat().st_mode & 0o077 == 0  # the customer's code: private


def test_killed_writer_leaves_readers_on_the_previous_snapshot(shared):
    d, repo = shared
    before = (d / POINTER).read_bytes()
    _write(repo, "NEW")
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(SRC)!r})
        from codemoat.index.store import SqliteIndex
        from codemoat.index.update import update_repository
        def progress(done, total, path):
            if done == {N // 2}:
                os._exit(9)
        update_repository(SqliteIndex({str(d)!r}), "payments", progress)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    assert (d / POINTER).read_bytes() == before
    reader = SqliteIndex(d)
    assert (_count(reader, "OLD"), _count(reader, "NEW")) == (N, 0)
    assert [n for n in os.listdir(d / "snapshots") if n.startswith(".building-")]  # the half-built file, unpublished
    update_repository(SqliteIndex(d), "payments")  # the next writer is not blocked by the dead one's lock
    assert reader.refresh() and (_count(reader, "OLD"), _count(reader, "NEW")) == (0, N)


_READER = """
import json, sys, time
sys.path.insert(0, {src!r})
from codemoat.index.store import SqliteIndex
s = SqliteIndex({d!r})
seen = []
deadline = time.time() + 60
while time.time() < deadline:
    s.refresh()
    c = s.db.execute("SELECT sum(text LIKE '%OLD_MARKER%'), sum(text LIKE '%NEW_MARKER%') FROM chunks").fetchone()
    seen.append(list(c))
    if len(seen) == 1:
        print("reading", flush=True)
    if c[1] == {n}:
        break
print(json.dumps(seen))
"""


def test_two_reader_processes_see_the_update_whole(shared):
    d, repo = shared
    readers = [
        subprocess.Popen([sys.executable, "-c", _READER.format(src=str(SRC), d=str(d), n=N)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for p in readers:  # both are reading the old snapshot
        assert p.stdout.readline().strip() == "reading"
    _write(repo, "NEW")
    update_repository(SqliteIndex(d), "payments")
    for p in readers:
        out, _ = p.communicate(timeout=90)
        seen = json.loads(out)
        assert seen[0] == [N, 0] and seen[-1] == [0, N], (seen[0], seen[-1])  # old first, then the new one
        assert all(s in ([N, 0], [0, N]) for s in seen), [s for s in seen if s not in ([N, 0], [0, N])]


def test_old_snapshots_are_collected_after_the_grace_period(shared, monkeypatch):
    d, repo = shared
    snaps = d / "snapshots"
    for v in ("A", "B"):
        _write(repo, v)
        update_repository(SqliteIndex(d), "payments")
    assert sorted(os.listdir(snaps)) == ["snap-000001.db", "snap-000002.db", "snap-000003.db"]  # within the grace period
    stale = snaps / ".building-dead.db"
    stale.write_bytes(b"half")
    later = time.time() + 3600
    gone = SnapshotDir(d).collect(now=later)
    assert sorted(gone) == [".building-dead.db", "snap-000001.db", "snap-000002.db"]
    assert sorted(os.listdir(snaps)) == ["snap-000003.db"]  # the current one always stays
    monkeypatch.setenv("CODEMOAT_RETRIEVAL__INDEX_SNAPSHOT_GRACE_S", "0")
    _write(repo, "C")
    update_repository(SqliteIndex(d), "payments")  # publishing collects too
    assert sorted(os.listdir(snaps)) == ["snap-000004.db"]


def test_pointer_that_names_no_snapshot_is_a_one_line_error(shared):
    d, _ = shared
    (d / POINTER).write_text("../../etc/passwd\n")
    with pytest.raises(CodemoatError, match="names no snapshot"):
        SqliteIndex(d).repos()
