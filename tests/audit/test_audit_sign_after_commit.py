"""A record committed whose head could not be signed (PostgreSQL, `sign_every = 1`): written once, its answer served.

On PostgreSQL a group commit's records commit first (`audit.pgappend`, autocommit) and the head naming them is
signed in the next transaction. Before, a database error in that signature failed every waiter of the batch
(`AuditUnavailable`) although their records were in the chain: a whole answer got a 503 under a record saying
200, and a delivered stream's record was kept (`serve/late.py`) and appended again once the log took records:
the request twice in the chain (reviewer V3, session 17). Now the append returns (the record is in the chain,
the answer matches it), the log counts as unavailable until the head is signed, and that signature checks the
records are still in the chain before anything is appended after them.

The signature fails for a real database-side cause: a trigger on `audit_head` that raises on every write of the
head row (the record INSERT and the writability probe, a write to `audit_records`, pass). On SQLite the head is
signed in the records' own transaction, so the same trigger takes the record with it: nothing was written, the
stream's record is kept and written once later, also exactly once (the other parameter)."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sqlite3
import threading

import pytest
import sqlalchemy as sa
from ports import free_port
from waiting import wait_for

from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.db import open_db

from .logs import fill, open_log
from .test_audit_trust import client_for, complete
from .trustapp import make_tokens, records, tiny_llm

llm = tiny_llm  # the module's engine (trustapp)

_PG_REFUSE = """
CREATE FUNCTION refuse_head() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'head refused'; END $$;
CREATE TRIGGER refuse_head BEFORE INSERT OR UPDATE ON audit_head FOR EACH ROW EXECUTE FUNCTION refuse_head();
"""
_PG_ALLOW = "DROP TRIGGER refuse_head ON audit_head; DROP FUNCTION refuse_head();"


class Heads:
    """Makes the database refuse writes of the signed head row, and take them again."""

    def __init__(self, url: str):
        self.url = url

    def refuse(self) -> None:
        if self.url.startswith("sqlite"):  # a write into a table that is gone ("no such table"), as in the late tests
            con = sqlite3.connect(self.url.removeprefix("sqlite:///"))
            con.execute("CREATE TABLE gone (x)")
            con.execute("CREATE TRIGGER refuse_head BEFORE UPDATE ON audit_head BEGIN INSERT INTO gone VALUES (1); END")
            con.execute("DROP TABLE gone")
            con.commit()
            con.close()
            return
        eng = sa.create_engine(self.url)
        with eng.begin() as c:
            c.exec_driver_sql(_PG_REFUSE)
        eng.dispose()

    def allow(self) -> None:
        if self.url.startswith("sqlite"):
            con = sqlite3.connect(self.url.removeprefix("sqlite:///"))
            con.execute("DROP TRIGGER refuse_head")
            con.commit()
            con.close()
            return
        eng = sa.create_engine(self.url)
        with eng.begin() as c:
            c.exec_driver_sql(_PG_ALLOW)
        eng.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, audit_home):
    """(the database's URL, its accounts, a token per user) on each backend; the log signs after every record."""
    if request.param == "sqlite":
        url = f"sqlite:///{audit_home / 'codemoat.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    eng = open_db(url)
    accounts = Accounts(eng)
    yield url, accounts, make_tokens(accounts)
    eng.dispose()


def _detail(r: dict) -> dict:
    d = r.get("detail")
    return json.loads(d) if isinstance(d, str) else (d or {})


def _streamed(c, headers):
    body = {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 6, "temperature": 0, "stream": True}
    return c.post("/v1/completions", json=body, headers=headers)


def test_a_stream_whose_head_was_not_signed_is_recorded_once(backend, llm, caplog):
    url, accounts, tokens = backend
    caplog.set_level(logging.ERROR, logger="codemoat.audit")
    heads = Heads(url)
    with client_for(Settings(audit={"sign_every": 1}), accounts, llm) as c:
        trust = c.app.state.trust
        assert complete(c, tokens["alice"]).status_code == 200  # the head row exists and is signed
        heads.refuse()
        r = _streamed(c, tokens["alice"])
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")  # delivered whole
        pg = url.startswith("postgresql")
        if pg:  # committed before its head: in the chain, served, not kept to be written again
            assert len(trust.late) == 0 and len(records(trust.log.engine)) == 2
            assert "kept to be written" not in caplog.text
        else:  # the head in the record's transaction: neither is written, the record is kept
            assert len(trust.late) == 1 and len(records(trust.log.engine)) == 1
        # nothing more is appended while the head cannot be signed: a whole answer is refused, unrecorded
        assert complete(c, tokens["bob"]).status_code == 503
        assert len(records(trust.log.engine)) == (2 if pg else 1)
        heads.allow()
        assert wait_for(lambda: trust.log.check_writable(max_age=0))
        assert complete(c, tokens["bob"]).status_code == 200
        assert wait_for(lambda: len(trust.late) == 0)
        rows = records(trust.log.engine)
        # each request served is in the chain once: alice's stream (late on SQLite only) and the two answers
        assert sorted((x["user"], x["status"]) for x in rows) == [("alice", 200), ("alice", 200), ("bob", 200)]
        assert sum(1 for x in rows if _detail(x).get("late")) == (0 if pg else 1)
        rep = trust.log.verify()
        assert rep.ok, rep.problem


def test_a_whole_answer_whose_head_was_not_signed_is_served_as_its_record_says(pg_url, audit_home, llm):
    eng = open_db(pg_url)
    accounts = Accounts(eng)
    tokens = make_tokens(accounts)
    heads = Heads(pg_url)
    try:
        with client_for(Settings(audit={"sign_every": 1}), accounts, llm) as c:
            trust = c.app.state.trust
            assert complete(c, tokens["alice"]).status_code == 200
            heads.refuse()
            r = complete(c, tokens["bob"], "def mul(a, b):", 5)
            # its record is in the chain with status 200 and its tokens: the answer is the one it records
            assert r.status_code == 200
            rec = records(trust.log.engine)[-1]
            assert (rec["user"], rec["status"], rec["completion_tokens"]) == ("bob", 200, r.json()["usage"]["completion_tokens"])
            assert complete(c, tokens["bob"]).status_code == 503  # the head is owed: nothing is appended after it
            heads.allow()
            assert wait_for(lambda: trust.log.check_writable(max_age=0))
            rep = trust.log.verify()
            assert rep.ok and rep.records == 2 and rep.head_seq == 2, rep.problem  # signed before anything else
    finally:
        eng.dispose()


def test_the_owed_head_is_signed_before_the_next_record(pg_url, audit_home, caplog):
    caplog.set_level(logging.ERROR, logger="codemoat.audit")
    log = open_log(pg_url, audit_home, sign_every=1)
    fill(log, 2)
    heads = Heads(pg_url)
    heads.refuse()
    assert log.append("request", user="mallory", route="/v1/completions", status=200) == 3  # written: it returns
    assert any("record 3" in m and "could not be signed" in m for m in caplog.messages)  # the trace outside the database
    from codemoat.audit.log import AuditUnavailable

    with pytest.raises(AuditUnavailable):
        log.append("request", user="bob")
    assert len(list(log.records())) == 3 and not log.check_writable(max_age=0)
    heads.allow()
    assert log.check_writable(max_age=0)  # signs the owed head first
    rep = log.verify()
    assert rep.ok and rep.head_seq == 3 and rep.unsigned == 0, rep.problem
    assert log.append("request", user="bob") == 4
    log.close()


def test_an_owed_record_cut_while_its_head_was_refused_stops_the_writer(pg_url, audit_home):
    """The DBA makes the head unwritable, lets a request be served (its record committed), deletes that record
    and winds the tip back, then lets the head be written again: the signature owed checks the record first."""
    from codemoat.audit.log import AuditUnavailable

    log = open_log(pg_url, audit_home, sign_every=1)
    fill(log, 2)
    heads = Heads(pg_url)
    heads.refuse()
    assert log.append("request", user="mallory", route="/v1/completions", status=200) == 3
    with log.engine.begin() as c:
        prev = c.execute(sa.text("select hash from audit_records where seq = 2")).scalar()
        c.execute(sa.text("delete from audit_records where seq = 3"))
        c.execute(sa.text("update audit_tip set seq = 2, hash = :h where id = 1"), {"h": prev})
    heads.allow()
    assert not log.check_writable(max_age=0)
    with pytest.raises(AuditUnavailable, match="record 3, just written, is no longer in the chain"):
        log.append("request", user="bob")
    assert [r["user"] for r in log.records()] == ["alice", "alice"]  # nothing linked over the cut
    assert "tampered" in (log.failure or "")


class CuttingProxy:
    """A TCP forwarder on 127.0.0.1 in front of the test's PostgreSQL. Armed, it forwards the first statement
    that inserts audit records, and when the server's answer to it comes back (the records committed: one
    statement in autocommit), it drops that answer and every connection and stops listening, as a network
    cut right after a commit would; `resume` listens again on the same port."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.armed = False
        self.before_commit = False  # cut when the statement is sent instead, so that nothing commits
        self.after_send = False  # cut once the statement went out, without waiting for its answer
        self.keep_listening = False  # a cut closes the connections only: new ones are taken at once
        self.cut_done = threading.Event()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.resume()

    def resume(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by `cut` or `close`
            try:
                server = socket.create_connection(self.target, timeout=30)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks.update((client, server))
            state = {"insert": False}
            threading.Thread(target=self._pump, args=(client, server, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, state, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict, upstream: bool) -> None:
        seen = b""
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            if upstream:
                seen = (seen + data)[-65536:]
                if self.armed and b"INSERT INTO audit_records" in seen:
                    if self.before_commit:  # the statement never reaches the server
                        self.cut()
                        return
                    if self.after_send:  # it reaches the server, whose answer never comes back
                        try:
                            dst.sendall(data)
                        except OSError:
                            pass
                        self.cut()
                        return
                    state["insert"] = True
            elif state["insert"] and self.armed:
                self.cut()  # the commit's answer: never delivered
                return
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self._lock:
            self.armed = False
            listener, self._listener = (None, self._listener) if self.keep_listening else (self._listener, None)
            socks, self._socks = list(self._socks), set()
        if listener is not None:  # shut down first: close() alone leaves a thread's pending accept() listening
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.cut_done.set()

    def close(self) -> None:
        self.armed, self.keep_listening = False, False
        self.cut()


@contextlib.contextmanager
def behind_proxy(pg_cluster, pg_url: str, llm, settings: Settings | None = None, **kw):
    """(the `CuttingProxy`, the app's database engine, the users' tokens, a client of the real app) with the app's
    database reached through the proxy; all closed after."""
    proxy = CuttingProxy(pg_cluster.port)
    eng = open_db(pg_url.replace(f":{pg_cluster.port}/", f":{proxy.port}/"))
    try:
        accounts = Accounts(eng)
        tokens = make_tokens(accounts)
        with client_for(settings or Settings(audit={"sign_every": 1}), accounts, llm, **kw) as c:
            yield proxy, eng, tokens, c
    finally:
        proxy.close()
        eng.dispose()


@pytest.mark.parametrize("committed", [True, False], ids=["cut-after-commit", "cut-before-commit"])
def test_a_stream_whose_connection_was_cut_at_its_record_is_recorded_once(pg_cluster, pg_url, audit_home, llm, committed):
    """The network between the writer and PostgreSQL fails right after the stream's record committed, and the
    server stays unreachable while the writer reads back whether it had (`audit.pgappend`): the stream is kept
    as unrecorded. Once the log takes records again, the kept record is written only if the first one is not
    in the chain (before, it was written again: the request twice), and what follows it (usage row, quota) once.
    The other side: cut before the statement reached the server, the kept record is written, marked late."""
    with behind_proxy(pg_cluster, pg_url, llm) as (proxy, eng, tokens, c):
        trust = c.app.state.trust
        assert complete(c, tokens["alice"]).status_code == 200
        proxy.before_commit, proxy.armed = not committed, True
        r = _streamed(c, tokens["alice"])
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert proxy.cut_done.wait(10) and len(trust.late) == 1  # committed, but the writer could not know
        proxy.resume()
        assert wait_for(lambda: trust.log.check_writable(max_age=0))
        assert complete(c, tokens["bob"]).status_code == 200
        assert wait_for(lambda: len(trust.late) == 0)
        rows = records(trust.log.engine)
        assert sorted((x["user"], x["status"]) for x in rows) == [("alice", 200), ("alice", 200), ("bob", 200)]
        # after the commit: the first append's record, found in the chain; before it: the kept one, late
        assert sum(1 for x in rows if _detail(x).get("late")) == (0 if committed else 1)
        with eng.connect() as db:  # what goes with it (the usage row) followed it once
            users = sorted(u for (u,) in db.execute(sa.text('select "user" from usage_completions')))
        assert users == ["alice", "alice", "bob"]
        rep = trust.log.verify()
        assert rep.ok, rep.problem
