"""The Repositories page names each index's languages (files by extension, counted in SQL); a file
whose only dot is in a folder's name is no language."""

from __future__ import annotations

from conftest import run_cli
from consoleapp import signed_in
from fastapi.testclient import TestClient

from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.console.repos import languages
from codemoat.db import open_db
from codemoat.engines.holder import ModelHolder
from codemoat.serve.app import create_app


def test_languages_of_each_repository(home, tmp_path):
    from codemoat.index.store import SqliteIndex, default_path
    from codemoat.index.update import add_repository

    repo = tmp_path / "svc"
    (repo / "v1.2").mkdir(parents=True)
    (repo / "a.py").write_text("def a():\n    return 1\n")
    (repo / "B.PY").write_text("def b():\n    return 2\n")
    (repo / "main.go").write_text("package main\n\nfunc main() {}\n")
    (repo / "v1.2" / "README").write_text("the dot is the folder's\n")
    store = SqliteIndex(default_path())
    add_repository(store, repo, "svc", ["everyone"])
    rid = store.repo("svc").id
    indexed = {r[0] for r in store.db.execute("SELECT path FROM files")}
    assert "v1.2/README" in indexed  # really in the index, and left out below
    assert languages(store) == {rid: [("python", 2), ("go", 1)]}
    store.close()

    accounts = Accounts(open_db(f"sqlite:///{home / 'codemoat.db'}"))
    _, admin = accounts.create_token("root", user="root", scopes=("admin",))
    with TestClient(create_app(Settings(), holder=ModelHolder("m"), accounts=accounts)) as c:
        assert signed_in(c, admin).status_code == 303
        assert '<td class="langs">python 2, go 1</td>' in c.get("/admin/repositories").text


def test_each_repository_shows_its_last_updates_skipped_and_refused_files(home, tmp_path):
    """`codemoat index add/update` (not only a console re-index) leaves what it skipped and refused for
    the Repositories page; a link out of the repository is named as refused, escaped, never read."""
    repo = tmp_path / "svc"
    repo.mkdir()
    (repo / "a.py").write_text("def a():\n    return 1\n")
    (repo / "blob.py").write_bytes(bytes(range(256)) * 12)  # binary: skipped
    (repo / "<b>leak.py").symlink_to(home / "machine.key")  # out of the repository: refused, never followed
    r = run_cli("index", "add", str(repo), "--name", "svc", "--groups", "everyone")
    assert r.returncode == 0, r.stderr

    accounts = Accounts(open_db(f"sqlite:///{home / 'codemoat.db'}"))
    _, admin = accounts.create_token("root", user="root", scopes=("admin",))
    with TestClient(create_app(Settings(), holder=ModelHolder("m"), accounts=accounts)) as c:
        assert signed_in(c, admin).status_code == 303
        page = c.get("/admin/repositories").text
    assert "1 skipped, 1 refused" in page
    assert "<code>&lt;b&gt;leak.py</code>: symlink to outside the repository" in page and "<b>leak.py" not in page


def test_an_index_from_before_the_report_column_is_upgraded_in_place(home, tmp_path):
    import sqlite3

    from codemoat.index.store import SqliteIndex, default_path
    from codemoat.index.update import add_repository, update_repository

    repo = tmp_path / "svc"
    repo.mkdir()
    (repo / "a.py").write_text("def a():\n    return 1\n")
    store = SqliteIndex(default_path())
    add_repository(store, repo, "svc", ["everyone"])
    store.close()
    with sqlite3.connect(default_path()) as db:  # what schema 2 wrote: no last_report column
        db.execute("ALTER TABLE repos DROP COLUMN last_report")
        db.execute("PRAGMA user_version=2")
    store = SqliteIndex(default_path())
    assert store.repo("svc").last_report is None  # upgraded in place: the column is back, empty
    (repo / "b.py").write_text("def b():\n    return 2\n")
    update_repository(store, "svc")
    assert store.repo("svc").last_report["indexed"] == 1
    store.close()
