"""A whole answer refused because its record's commit was not confirmed, whose record is in the chain all the same.

A whole answer goes out only once its record is written; if the append fails the client gets a 503 instead
(`serve.auditing`). On PostgreSQL the append can fail after the record committed: the network is cut with the
commit's answer, and the server stays unreachable while the writer reads back whether it had
(`audit.pgappend`). The chain then held a record saying 200, with its tokens, for an answer its client never
got (left alone in sessions 18 and 19). Now the refused answer's record is looked up once the log takes records
again (`serve.late` `doubt`): found, a `withheld` record names it and says the client got a 503; not found
(the cut came before the commit), nothing is added. Neither writes a usage row for the refused answer.

A real PostgreSQL behind a real TCP proxy that cuts every connection at the INSERT's answer (or before the
statement reaches the server), the real app, a real llama.cpp engine."""

from __future__ import annotations

import logging
import time

import pytest
import sqlalchemy as sa
from waiting import wait_for

from codemoat import paths
from codemoat.accounts import Accounts
from codemoat.audit.quota import Quotas
from codemoat.config import Settings
from codemoat.db import open_db
from codemoat.serve.doubtstore import folder_for

from .test_audit_sign_after_commit import _detail, behind_proxy
from .test_audit_trust import client_for, complete
from .trustapp import make_tokens, records, tiny_llm

llm = tiny_llm  # the module's engine (trustapp)


@pytest.mark.parametrize("committed", [True, False], ids=["cut-after-commit", "cut-before-commit"])
def test_a_refused_answer_whose_record_committed_gets_a_withheld_record(
    pg_cluster, pg_url, audit_home, llm, committed, caplog, monkeypatch
):
    """Not found at first, a record is looked up again once `FINAL_S` has passed (here 2 s): a statement whose
    connection was lost may still commit until the server's statement_timeout; then it is dropped."""
    from codemoat.serve import late

    monkeypatch.setattr(late, "FINAL_S", 2.0)
    caplog.set_level(logging.WARNING, logger="codemoat.audit")
    with behind_proxy(pg_cluster, pg_url, llm) as (proxy, eng, tokens, c):
        trust = c.app.state.trust
        assert complete(c, tokens["alice"]).status_code == 200
        proxy.before_commit, proxy.armed = not committed, True
        r = complete(c, tokens["alice"], "def mul(a, b):", 5)
        assert r.status_code == 503 and proxy.cut_done.wait(10)  # the answer is withheld: its record is not confirmed
        assert trust.late.doubts == 1 and len(trust.late) == 0
        store = trust.late._store  # on disk, in this chain's folder, for a server that takes over if this one dies
        assert store.folder == folder_for(paths.home(), trust.db_url) and len(store.path.read_bytes().splitlines()) == 1
        proxy.resume()
        assert wait_for(lambda: trust.log.check_writable(max_age=0))
        assert complete(c, tokens["bob"]).status_code == 200
        if not committed:  # looked up once, not found: it waits for FINAL_S, then the next request settles it
            assert wait_for(lambda: trust.late._task is not None and trust.late._task.done())
            assert trust.late.doubts == 1
            time.sleep(2.0)
            assert complete(c, tokens["bob"]).status_code == 200
        assert wait_for(lambda: trust.late.doubts == 0)
        assert not store.path.exists(), "the settled doubt stayed on disk"
        rows = records(trust.log.engine, kind=None)
        requests = [(x["user"], x["status"]) for x in rows if x["kind"] == "request"]
        withheld = [x for x in rows if x["kind"] == "withheld"]
        if committed:  # alice's second record is in the chain, and the record after it says she got a 503
            assert requests == [("alice", 200), ("alice", 200), ("bob", 200)]
            first = next(x for x in rows if x["kind"] == "request" and x["seq"] > rows[0]["seq"])
            assert len(withheld) == 1
            w = withheld[0]
            assert (w["user"], w["status"], w["route"]) == ("alice", 503, "/v1/completions")
            assert _detail(w)["record"] == first["seq"] and _detail(w)["status"] == 200
            assert "in the chain after all" in caplog.text
        else:  # nothing committed: no record of it, and nothing to correct
            assert requests == [("alice", 200), ("bob", 200), ("bob", 200)] and withheld == []
        with eng.connect() as db:  # the withheld answer has no usage row
            users = sorted(u for (u,) in db.execute(sa.text('select "user" from usage_completions')))
        assert users == ["alice", "bob"] + ([] if committed else ["bob"])
        metric = c.get("/metrics", headers=tokens["scraper"]).text
        assert ('codemoat_audit_records_total{kind="withheld"} 1.0' in metric) == committed
        # nor do a restarted server's token budgets count it (`Quotas.seed` reads today's request records)
        quotas = Quotas(tokens_per_day=1000)
        quotas.seed(trust.log)
        assert quotas.used_today("alice") == rows[0]["completion_tokens"] > 0
        rep = trust.log.verify()
        assert rep.ok, rep.problem


def test_a_refused_answer_on_sqlite_is_not_looked_up(audit_home, llm, tmp_path):
    """SQLite never commits a record whose append raised: nothing is kept to look up."""
    import sqlite3

    eng = open_db(f"sqlite:///{tmp_path / 'x.db'}")
    accounts = Accounts(eng)
    tokens = make_tokens(accounts)
    try:
        with client_for(Settings(), accounts, llm) as c:
            trust = c.app.state.trust
            assert complete(c, tokens["alice"]).status_code == 200
            path = str(trust.log.engine.url.database)
            con = sqlite3.connect(path)  # every later append fails inside its transaction
            con.execute("CREATE TABLE gone (x)")
            con.execute("CREATE TRIGGER refuse BEFORE INSERT ON audit_records BEGIN INSERT INTO gone VALUES (1); END")
            con.execute("DROP TABLE gone")
            con.commit()
            assert complete(c, tokens["alice"]).status_code == 503
            assert trust.late.doubts == 0 and trust.late._store is None
            con.execute("DROP TRIGGER refuse")
            con.commit()
            con.close()
    finally:
        eng.dispose()


def test_an_answer_that_failed_is_not_called_withheld(pg_cluster, pg_url, audit_home, llm):
    """Only an answer a 503 replaced is looked up: an engine that falls over mid-answer is a 500 whatever its record
    does, so a record of it cut at its commit says what the client got, and nothing is kept to correct it."""
    from .trustapp import Broken

    with behind_proxy(pg_cluster, pg_url, Broken(llm), raise_server_exceptions=False) as (proxy, eng, tokens, c):
        trust = c.app.state.trust
        proxy.armed = True
        r = complete(c, tokens["alice"])
        assert r.status_code == 500 and proxy.cut_done.wait(10)
        assert trust.late.doubts == 0 and len(trust.late) == 0
