"""An outside tester's findings on the console, each was broken: a sign-in form whose CSRF value was not ASCII
(a 500 for anyone, before any sign-in), a form past the size limit cut short and acted on (groups lost, or one
cut into another group's name), cost inputs each in range whose arithmetic overflowed (a 500)."""

from __future__ import annotations

from dataclasses import fields

import pytest
from consoleapp import csrf_of, signed_in
from fastapi.testclient import TestClient

from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.db import open_db
from codemoat.engines.holder import ModelHolder
from codemoat.serve.app import create_app


@pytest.fixture
def setup(home):
    engine = open_db(f"sqlite:///{home / 'codemoat.db'}")
    accounts = Accounts(engine)
    _, admin = accounts.create_token("root", user="root", scopes=("admin",))
    app = create_app(Settings(), holder=ModelHolder("sealed-model"), accounts=accounts)
    with TestClient(app, base_url="http://testserver", raise_server_exceptions=False) as c:
        yield c, accounts, admin


def test_a_non_ascii_sign_in_csrf_value_is_a_refusal_not_a_500(setup):
    """secrets.compare_digest raises TypeError on a str holding a non-ASCII character: a sign-in POST whose form
    `csrf` (or whose sign-in cookie) held one was a 500 with a traceback in the log, no token needed."""
    c, _, admin = setup
    for cookie, value in (("abc", "é"), ("é", "abc"), ("é", "é")):  # the cookie's byte 0xE9 reads as "é" (latin-1)
        headers = {"Cookie": f"codemoat_signin={cookie}".encode("latin-1")}
        r = c.post("/admin/signin", data={"csrf": value, "token": "x"}, headers=headers, follow_redirects=False)
        assert r.status_code == 403 and "did not come from this console" in r.text, (cookie, value, r.status_code, r.text[:200])
        assert "Traceback" not in r.text
    assert signed_in(c, admin).status_code == 303  # the real form still signs in


def test_a_form_past_the_size_limit_is_refused_whole_not_cut_short(setup):
    """The form reader kept the first 64 KiB of a body and parsed that: a groups field past it lost its last groups
    (or kept one cut short, which may name another group: `eng-admins` cut to `eng`), and the action ran, a 303 as if
    all was well. Now such a form is a 413 that changes nothing; one under the limit still acts."""
    c, accounts, admin = setup
    accounts.add_user("dev", ["web"])
    assert signed_in(c, admin).status_code == 303
    csrf = csrf_of(c.get("/admin/people").text)
    groups = ",".join(f"team-{i:05d}" for i in range(6000)) + ",eng-admins"
    body = f"csrf={csrf}&user=dev&groups={groups}"
    assert len(body) > 64 * 1024
    r = c.post(
        "/admin/people/groups",
        content=body,
        headers={"content-type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert r.status_code == 413 and "larger than 64 KiB" in r.text, (r.status_code, r.text[:200])
    assert next(u for u in accounts.list_users() if u["name"] == "dev")["groups"] == ["web"]
    r = c.post("/admin/people/groups", data={"csrf": csrf, "user": "dev", "groups": "web,eng-admins"}, follow_redirects=False)
    assert r.status_code == 303
    assert sorted(next(u for u in accounts.list_users() if u["name"] == "dev")["groups"]) == ["eng-admins", "web"]


def test_cost_inputs_close_to_zero_are_a_one_line_error_not_a_500(setup):
    """Each input in range (≥ 0, ≤ 1e12), but 1e-320 GPUs per server (or tokens per second, hours a day, a share...)
    divided into an infinity that math.floor/ceil refuse: /admin/costs was a 500 (OverflowError). Now the page, with
    a one-line error and the defaults' case."""
    from codemoat.tco import Inputs

    c, _, admin = setup
    assert signed_in(c, admin).status_code == 303
    for name in (f.name for f in fields(Inputs) if f.name != "sources"):
        r = c.get("/admin/costs", params={name: "1e-320"})
        assert r.status_code == 200 and "Traceback" not in r.text, (name, r.status_code, r.text[:200])
    for q in ({"gpus_per_server": "1e-320"}, {"prefill_tps": "1e-300"}, {"depreciation_years": "1e-320", "developers": "3"}):
        r = c.get("/admin/costs", params=q)
        assert r.status_code == 200 and "overflow the model" in r.text and 'id="onprem-monthly"' in r.text, (q, r.text[:300])
    # each in range, and no exception in the model: amounts of inf (whose chart was a 500, OverflowError)
    for q in (
        {"prefill_tps": "1e-290", "server_price": "1e12", "depreciation_years": "1e-6"},
        {"decode_tps": "1e-300", "kwh_price": "1e12"},
    ):
        r = c.get("/admin/costs", params=q)
        assert r.status_code == 200 and "overflow the model" in r.text and "$inf" not in r.text, (q, r.status_code, r.text[:300])
    assert "overflow" not in c.get("/admin/costs", params={"gpus_per_server": "2"}).text  # a sane input: no error


def test_a_token_named_like_another_tokens_id_cannot_shield_it_from_revocation(setup):
    """The Revoke button posts the token's id, and the page revoked through `Accounts.revoke_token`, which takes an id
    or a name and refuses when two active tokens match. A developer signing in through the directory names their own
    token (`codemoat login --name`): one named like their other token's id made that token impossible to revoke from the
    People page ("2 active tokens are named ..."). The page now revokes by id: that token, and only it."""
    c, accounts, admin = setup
    target, secret = accounts.create_token("laptop", user="dev", scopes=("complete",))
    shield, shield_secret = accounts.create_token(target.id, user="dev", scopes=("complete",))  # named like its id
    assert signed_in(c, admin).status_code == 303
    csrf = csrf_of(c.get("/admin/people").text)
    r = c.post("/admin/people/tokens/revoke", data={"csrf": csrf, "id": target.id}, follow_redirects=False)
    assert r.status_code == 303, (r.status_code, r.text[-600:])
    state = {t.id: t.active for t in accounts.list_tokens()}
    assert state[target.id] is False and state[shield.id] is True
    assert accounts.authenticate(shield_secret).token_id == shield.id
    with pytest.raises(Exception, match="revoked"):
        accounts.authenticate(secret)
    r = c.post("/admin/people/tokens/revoke", data={"csrf": csrf, "id": target.id})  # revoked already
    assert r.status_code == 400 and "no active token with id" in r.text
    r = c.post("/admin/people/tokens/revoke", data={"csrf": csrf, "id": "laptop"})  # a name is not an id
    assert r.status_code == 400 and "no active token with id" in r.text
    assert c.post("/admin/people/tokens/revoke", data={"csrf": csrf, "id": shield.id}, follow_redirects=False).status_code == 303
    assert not any(t.active for t in accounts.list_tokens() if t.user == "dev")


def test_a_console_address_that_is_no_page_answers_a_browser_in_html(setup):
    """Was: a mistyped /admin address, or a GET of a form's address (sign-out is a POST), answered a browser with a
    JSON body. Now an HTML page under the console's headers, with the way back; the JSON API keeps its JSON."""
    c, _, admin = setup
    for method, path, status in (("GET", "/admin/nonexist", 404), ("GET", "/admin/signout", 405), ("GET", "/admin/x/<b>", 404)):
        r = c.request(method, path)
        assert r.status_code == status and r.headers["content-type"].startswith("text/html"), (path, r.status_code, r.text)
        assert '<a href="/admin">' in r.text and "<b>" not in r.text and "default-src" in r.headers["content-security-policy"]
    assert "POST" in c.get("/admin/signout").headers["allow"]
    r = c.get("/admin/api/nonexist", headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 404 and r.headers["content-type"] == "application/json", r.headers


def test_the_audit_page_shows_records_a_dba_edited_into_odd_values(setup, home):
    """A record someone edited in the database (SQLite keeps any value in any column): a latency that is text, a
    secret refusal whose detail is no object. The audit page showed none of the log: a 500 (TypeError in its
    template). Now it shows them as stored, and `audit verify` still names the edit."""
    import sqlite3

    c, _, admin = setup
    log = c.app.state.trust.log
    log.append("request", user="dev", route="POST /v1/completions", status=200, latency_ms=12.5)
    log.append("request", user="dev", route="POST /v1/completions", status=400, detail={"secrets": ["aws"]})
    db = sqlite3.connect(home / "codemoat.db")
    with db:
        db.execute(
            "UPDATE audit_records SET latency_ms = 'slow' WHERE seq = (SELECT MIN(seq) FROM audit_records WHERE user = 'dev')"
        )
        db.execute(
            "UPDATE audit_records SET detail = '\"secrets\": not json' WHERE seq = (SELECT MAX(seq) FROM audit_records WHERE user = 'dev')"
        )
    db.close()
    assert signed_in(c, admin).status_code == 303
    r = c.get("/admin/audit")
    assert r.status_code == 200 and "slow" in r.text and "not json" in r.text, (r.status_code, r.text[-500:])
    assert not log.verify().ok
