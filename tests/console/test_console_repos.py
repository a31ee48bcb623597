"""The Repositories page names each index's languages (files by extension, counted in SQL); a file
whose only dot is in a folder's name is no language."""

from __future__ import annotations

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
