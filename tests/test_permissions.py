"""$CODEMOAT_HOME is private to the account running codemoat: the folder 0700, every file in it 0600."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from conftest import create_token, run_cli


def _loose(home) -> list[str]:
    """Everything under `home` that a group or other account could read, with its mode."""
    out = []
    for p in [home, *home.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        if mode & 0o077:
            out.append(f"{p.relative_to(home)} {mode:o}")
    return out


def test_an_existing_0755_home_and_0644_database_are_made_private(tmp_path, home, serve_process, random_gguf):
    os.chmod(home, 0o755)
    old = os.umask(0o022)
    try:  # what an older codemoat (or a hand-made folder) left: a world-readable database and log
        sqlite3.connect(home / "codemoat.db").close()
        (home / "outbound.jsonl").write_text("")
    finally:
        os.umask(old)
    assert stat.S_IMODE((home / "codemoat.db").stat().st_mode) == 0o644
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.py").write_text("def a():\n    return 1\n")
    assert run_cli("index", "add", str(repo), "--name", "r").returncode == 0
    create_token("--name", "t")
    s = serve_process(["--model", str(random_gguf), "--model-id", "tiny"])  # holds both databases open
    names = {p.name for p in home.iterdir()}
    assert {"codemoat.db", "index.db", "machine.key"} <= names and any(n.endswith("-wal") for n in names)
    loose = [x for x in _loose(home) if not x.startswith(f"serve-{s.port}.log")]  # the test's own log file
    assert loose == []
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_files_created_in_a_fresh_home_are_0600(home):
    os.rmdir(home)
    r = run_cli("tokens", "create", "--name", "t", "--json")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert (home / "codemoat.db").exists() and _loose(home) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give the folder away")
def test_a_home_owned_by_another_account_is_refused_in_one_line(home):
    os.chown(home, 65534, 65534)
    r = run_cli("tokens", "list")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "belongs to another account" in r.stderr
    assert not (home / "codemoat.db").exists()
