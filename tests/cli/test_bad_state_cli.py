"""Bad state on disk (a damaged database, a data folder that is a file): one line naming it, nothing touched."""

import os
from pathlib import Path

from conftest import run_cli


def one_line(r, expected: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip() == expected, r.stderr


def test_damaged_database_is_named_and_left_as_it_is(home: Path):
    db = home / "codemoat.db"
    junk = os.urandom(8192)
    db.write_bytes(junk)
    for args in (("users", "list"), ("tokens", "create", "--name", "a"), ("audit", "verify")):
        one_line(
            run_cli(*args),
            f"error: {db} is not a codemoat database, or it is corrupted (not a SQLite file); it was left as it is",
        )
    assert db.read_bytes() == junk
    damaged = b"SQLite format 3\x00" + junk  # SQLite's header, then garbage: SQLite's own words
    db.write_bytes(damaged)
    for args in (("users", "list"), ("audit", "verify")):
        one_line(
            run_cli(*args),
            f"error: {db} is not a codemoat database, or it is corrupted (SQLite: file is not a database); it was left as it is",
        )
    assert db.read_bytes() == damaged
    # nothing else written: at most the empty lock file migrations serialise on (codemoat.db)
    others = {p.name: p.stat().st_size for p in home.iterdir() if p.name != "codemoat.db"}
    assert others in ({}, {"codemoat.db.migrate-lock": 0})


def test_a_database_url_naming_another_file_leaves_it_as_it_is(home: Path, tmp_path: Path):
    """CODEMOAT_DATABASE_URL=sqlite:////etc/passwd by mistake: refused before the file's mode is made private
    (it was chmod'ed 0600 first, taking other users' read access away, then refused by SQLite)."""
    other = tmp_path / "passwd"
    other.write_text("root:x:0:0:root:/root:/bin/bash\n")
    other.chmod(0o644)
    r = run_cli("users", "list", env={"CODEMOAT_DATABASE_URL": f"sqlite:///{other}"})
    one_line(r, f"error: {other} is not a codemoat database, or it is corrupted (not a SQLite file); it was left as it is")
    assert other.stat().st_mode & 0o777 == 0o644 and other.read_text() == "root:x:0:0:root:/root:/bin/bash\n"


def test_database_path_that_is_a_folder(home: Path):
    (home / "codemoat.db").mkdir()
    one_line(run_cli("users", "list"), f"error: cannot open database {home / 'codemoat.db'}: unable to open database file")


def test_codemoat_home_must_be_a_folder(tmp_path: Path):
    f = tmp_path / "home-file"
    f.write_text("keep me")
    one_line(
        run_cli("users", "list", env={"CODEMOAT_HOME": str(f)}),
        f"error: CODEMOAT_HOME must be a folder: {f} exists and is not one",
    )
    one_line(
        run_cli("users", "list", env={"CODEMOAT_HOME": str(f / "sub")}),
        f"error: CODEMOAT_HOME must be a folder: part of the path {f / 'sub'} is a file",
    )
    assert f.read_text() == "keep me"
