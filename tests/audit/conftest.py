"""Fixtures for the audit tests: a fresh $CODEMOAT_HOME and a migrated SQLite database in it, its
accounts and a token for each of trustapp's SCOPES."""

from __future__ import annotations

import pytest
from ports import free_port


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
def pg_url(request, audit_home):
    """A fresh database in the session's PostgreSQL cluster, dropped after the test."""
    cluster = request.getfixturevalue("pg_cluster")
    url = cluster.new_database()
    yield url
    cluster.drop_database(url)


@pytest.fixture
def port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()


@pytest.fixture
def accounts(engine):
    from codemoat.accounts import Accounts

    return Accounts(engine)


@pytest.fixture
def tokens(accounts):
    """trustapp's tokens (alice, bob, root, scraper): name -> its Authorization header."""
    from .trustapp import make_tokens

    return make_tokens(accounts)
