"""A database URL a user mistyped, and the exceptions nothing named, said in one line a user can act on: no
folders made for a typo, no Python exception text, no SQL or password."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlalchemy as sa
from cli_errors import one_line_error
from conftest import run_cli
from ports import free_port


def test_a_mistyped_sqlite_url_makes_no_folders(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/codmoat/data/x.db"  # a typo in a folder's name
    line = one_line_error(run_cli("users", "list", env={"CODEMOAT_DATABASE_URL": url}))
    assert f"database {url}: folder {tmp_path}/codmoat/data does not exist" in line
    assert list(tmp_path.iterdir()) == []


def test_a_url_in_an_existing_folder_and_the_default_database_are_made(tmp_path: Path):
    """The positive: a new database file in a folder that exists is created; so is a first run's data folder."""
    url = f"sqlite:///{tmp_path}/x.db"
    assert run_cli("users", "add", "alice", env={"CODEMOAT_DATABASE_URL": url}).returncode == 0
    assert (tmp_path / "x.db").is_file()
    home = tmp_path / "new-home"
    p = run_cli("users", "list", "--json", env={"CODEMOAT_HOME": str(home)})
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr
    assert (home / "codemoat.db").is_file() and (home.stat().st_mode & 0o777) == 0o700


def test_an_unreachable_postgresql_url_is_one_line_without_its_password():
    url = f"postgresql+psycopg://cm:pw-Secret-7@127.0.0.1:{free_port()}/codemoat"  # nothing listens there
    line = one_line_error(run_cli("users", "list", "--json", env={"CODEMOAT_DATABASE_URL": url}))
    assert line.startswith(f"error: database postgresql+psycopg://cm:***@127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}")
    assert "cannot open it" in line and "Connection refused" in line
    assert "pw-Secret-7" not in line and "OperationalError" not in line


def test_a_url_without_a_driver_or_not_a_url_is_one_line_without_its_password():
    line = one_line_error(run_cli("users", "list", env={"CODEMOAT_DATABASE_URL": "postgress://cm:pw-Secret-7@db/x"}))
    assert "no database driver for 'postgress'" in line and "pw-Secret-7" not in line
    line = one_line_error(run_cli("users", "list", env={"CODEMOAT_DATABASE_URL": "postgresql+psycopg2://cm:pw-Secret-7@db/x"}))
    assert "its driver is not installed (No module named 'psycopg2')" in line and "pw-Secret-7" not in line
    line = one_line_error(run_cli("users", "list", env={"CODEMOAT_DATABASE_URL": "cm:pw-Secret-7@db"}))
    assert "is not a database URL" in line and "pw-Secret-7" not in line


def test_a_database_error_after_opening_names_no_exception(home: Path):
    assert run_cli("users", "list").returncode == 0
    with sqlite3.connect(home / "codemoat.db") as c:  # a damaged database: a table gone
        c.execute("DROP TABLE tokens")
    line = one_line_error(run_cli("tokens", "list"))
    assert "the database failed (no such table: tokens)" in line and "check database_url" in line
    assert "OperationalError" not in line and "sqlite3" not in line


def test_a_value_that_is_not_utf8_is_said_so(home: Path):
    """A name with bytes that are not UTF-8 (a shell variable holding Latin-1): was "UnicodeEncodeError: 'utf-8'
    codec can't encode character '\\udcff' in position 0: surrogates not allowed"."""
    line = one_line_error(run_cli("tokens", "revoke", "tok\udcff"))
    assert "holds bytes that are not UTF-8 ('\\udcff'): give it as UTF-8 text" in line
    assert "UnicodeEncodeError" not in line and "surrogates" not in line


def test_explain_says_what_to_do_and_never_the_sql():
    from codemoat.cli.main import explain

    engine = sa.create_engine("sqlite://")
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE t (v TEXT UNIQUE)"))
        c.execute(sa.text("INSERT INTO t VALUES (:v)"), {"v": "cm_secret_value"})
    try:
        with engine.begin() as c:
            c.execute(sa.text("INSERT INTO t VALUES (:v)"), {"v": "cm_secret_value"})
    except sa.exc.IntegrityError as e:
        said = explain(e)
    assert said == "the database refused the command (IntegrityError); CODEMOAT_DEBUG=1 shows the details"
    try:
        int(float("inf"))
    except OverflowError as e:
        assert explain(e) == "a number given is out of range (cannot convert float infinity to integer): give a smaller value"
    try:
        "é".encode("ascii")
    except UnicodeEncodeError as e:
        assert explain(e) == "'\\xe9' cannot be written as ascii: use a UTF-8 locale (LANG=C.UTF-8), or --json"
    assert explain(ValueError("other")) == "ValueError: other"  # the negative: anything else keeps its name
