"""Was broken on PostgreSQL, which refuses a NUL character in any text a query sends it (psycopg's DataError): a NUL in
an audit filter (page, export, the admin API's `user`), a job id or any console form field reached a query, and the
answer was a 500 with a traceback in the log (a link sent to an admin was enough for the GET pages). Each is now a
one-line refusal in the page's or the API's shape, on SQLite and PostgreSQL alike; nothing is changed."""

from __future__ import annotations

import pytest
from consoleapp import csrf_of, signed_in
from fastapi.testclient import TestClient
from waiting import wait_for

from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.db import open_db
from codemoat.engines.holder import ModelHolder
from codemoat.serve.app import create_app


@pytest.fixture
def setup(database_url):
    accounts = Accounts(open_db(database_url))
    _, admin = accounts.create_token("root", user="root", scopes=("admin",))
    dev, _ = accounts.create_token("dev", user="dev", scopes=("complete",))
    app = create_app(Settings(), holder=ModelHolder("m"), accounts=accounts)
    with TestClient(app, base_url="http://testserver", raise_server_exceptions=False) as c:
        yield c, accounts, admin, dev


def test_a_nul_in_an_audit_filter_or_a_job_id_is_a_one_line_refusal(setup):
    c, _, admin, _ = setup
    c.app.state.trust.log.append("request", user="alice", route="/v1/completions", status=200)
    r = c.get("/admin/api/audit", params={"user": "a\x00b"}, headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 400 and r.json() == {"error": "user: a NUL character is in no user name"}, r.text[:300]
    assert signed_in(c, admin).status_code == 303
    for field in ("user", "route", "kind", "since"):
        r = c.get("/admin/audit", params={field: "a\x00"})
        assert r.status_code == 200 and f"{field}: a NUL character is in no audit record" in r.text, (field, r.text[:300])
        r = c.get("/admin/audit/export", params={field: "a\x00", "fmt": "csv"})
        assert r.status_code == 403 and "a NUL character" in r.text, (field, r.status_code, r.text[:300])
    r = c.get("/admin/repositories/jobs/a%00b")
    assert r.status_code == 404 and "No such job" in r.text, (r.status_code, r.text[:300])
    assert "alice" in c.get("/admin/audit", params={"user": "alice"}).text  # a real filter still filters


def test_a_nul_in_any_console_form_field_is_refused_and_changes_nothing(setup):
    c, accounts, admin, dev = setup
    assert signed_in(c, admin).status_code == 303
    csrf = csrf_of(c.get("/admin/people").text)
    before = ({t.id: t.active for t in accounts.list_tokens()}, accounts.list_users())
    for path, data in (
        ("/admin/people/disable", {"user": "dev\x00", "disabled": "1"}),
        ("/admin/people/tokens/revoke", {"id": dev.id + "\x00"}),
        ("/admin/people/groups", {"user": "dev\x00", "groups": "web"}),
        ("/admin/people/tokens", {"name": "ci", "user": "dev\x00", "scope_complete": "1"}),
        ("/admin/people/tokens", {"name": "ci\x00", "scope_complete": "1"}),
        ("/admin/repositories/reindex", {"name": "repo\x00"}),
    ):
        r = c.post(path, data={**data, "csrf": csrf}, follow_redirects=False)
        assert r.status_code == 400 and "a form field holds a NUL character" in r.text, (path, r.status_code, r.text[:300])
    assert ({t.id: t.active for t in accounts.list_tokens()}, accounts.list_users()) == before
    r = c.post("/admin/people/disable", data={"user": "dev", "disabled": "1", "csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and not next(t for t in accounts.list_tokens() if t.id == dev.id).active


def test_a_repository_name_longer_than_the_jobs_column_is_a_one_line_refusal(setup, tmp_path):
    """`codemoat index add` takes a repository name of any length; a console re-index of one past 256 characters was
    a 500 on PostgreSQL (value too long for the job table's column) and left the index open. Now a one-line 400 that
    starts no job; a name of 256 characters is re-indexed."""
    from codemoat.console.jobs import Jobs
    from codemoat.index.store import SqliteIndex, default_path
    from codemoat.index.update import add_repository

    c, _, admin, _ = setup
    store = SqliteIndex(default_path())
    for n, name in enumerate(("r" * 300, "s" * 256)):
        (tmp_path / str(n)).mkdir()
        (tmp_path / str(n) / "a.py").write_text("def a():\n    return 1\n")
        add_repository(store, tmp_path / str(n), name, ["everyone"])
    store.close()
    assert signed_in(c, admin).status_code == 303
    csrf = csrf_of(c.get("/admin/repositories").text)
    r = c.post("/admin/repositories/reindex", data={"csrf": csrf, "name": "r" * 300}, follow_redirects=False)
    assert r.status_code == 400 and "a repository name of 300 characters" in r.text, (r.status_code, r.text[:300])
    jobs = Jobs(c.app.state.trust.usage.engine)
    assert jobs.latest() == {}
    r = c.post("/admin/repositories/reindex", data={"csrf": csrf, "name": "s" * 256}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/admin/repositories/jobs/"), (r.status_code, r.text[:300])
    assert list(jobs.latest()) == ["s" * 256]
    assert wait_for(lambda: jobs.latest()["s" * 256].state == "finished"), jobs.latest()  # done before the database goes
