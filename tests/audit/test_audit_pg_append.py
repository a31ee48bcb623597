"""The PostgreSQL append path (`audit.pgappend`: records linked by the database's trigger, one flush
per group commit): the database links byte for byte as `audit.chain.link_hash` (and as the SQLite
writer does); writers signing at different paces make one chain; tamper evidence on the writer's
side (a record slipped in beyond the tip, a numbered INSERT, a deleted head); a writer whose
connection the server dropped carries on without a lost or doubled record."""

from __future__ import annotations


import pytest
import sqlalchemy as sa

from .logs import fill, open_log


def test_the_database_links_records_exactly_as_the_sqlite_writer_does(pg_url, audit_home):
    from codemoat.audit.chain import body_hash, link_hash

    pg = open_log(pg_url, audit_home)
    lite = open_log(f"sqlite:///{audit_home / 'same.db'}", audit_home)
    fields = [
        dict(user="alice", route="/v1/completions", status=200, latency_ms=12.345, ts=1_700_000_000.25),
        dict(user='bøb \u2603 "q" \\', prompt_text="def f():\n\treturn 1\x00", repos=["a", "b"], ts=1_700_000_001),
        dict(detail={"z": 1, "a": [1.5, None]}, prompt_tokens=7, completion_tokens=0, ts=1_700_000_002),
    ]
    for f in fields:
        assert pg.append("request", **f) == lite.append("request", **f)
    rows_pg, rows_lite = list(pg.records()), list(lite.records())
    assert [r["hash"] for r in rows_pg] == [r["hash"] for r in rows_lite]
    with pg.engine.connect() as c:
        raw = [r._asdict() for r in c.execute(sa.text("select * from audit_records order by seq"))]
    prev = "0" * 64
    for r in raw:  # recomputed here from the stored fields: the trigger's SQL is `link_hash`
        assert r["prev_hash"] == prev and r["hash"] == link_hash(r["seq"], prev, body_hash(r))
        prev = r["hash"]
    assert pg.verify().ok and lite.verify().ok


def test_writers_signing_at_different_paces_make_one_chain(pg_url, audit_home):
    every, batched = open_log(pg_url, audit_home), open_log(pg_url, audit_home, sign_every=8)
    seqs = fill(every, 25) + fill(batched, 7, 25) + fill(every, 8, 32)
    assert seqs == list(range(1, 41))
    rep = every.verify()
    assert rep.ok, rep.problem
    assert (rep.records, rep.checkpoints, rep.head_seq, rep.unsigned) == (40, 4, 40, 0)
    assert [r["prompt_tokens"] for r in every.records()] == list(range(40))


def test_group_commit_of_many_threads_on_one_connection(pg_url, audit_home):
    import threading

    log = open_log(pg_url, audit_home, sign_every=16)
    ts = [threading.Thread(target=fill, args=(log, 30, i * 100)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    log.close()
    rep = log.verify()
    assert rep.ok and rep.records == 240 and rep.unsigned == 0, rep.problem


def test_record_slipped_in_beyond_the_tip_stops_the_writer(pg_url, audit_home):
    from codemoat.audit.log import AuditUnavailable

    log = open_log(pg_url, audit_home)
    fill(log, 5)
    with log.engine.begin() as c:  # a copy of record 5 as record 6, the chain's trigger switched off
        c.execute(sa.text("alter table audit_records disable trigger audit_chain"))
        c.execute(
            sa.text(
                'insert into audit_records select 6, ts_us, kind, "user", token_id, route, protocol, model, repos, '
                "snippets, prompt_tokens, completion_tokens, latency_ms, status, client, prompt_text, completion_text, "
                "detail, hash, hash from audit_records where seq = 5"
            )
        )
        c.execute(sa.text("alter table audit_records enable trigger audit_chain"))
    with pytest.raises(AuditUnavailable, match="tampered: a record exists beyond the chain's tip"):
        log.append("request", user="bob")
    assert not log.check_writable()  # the writer stays refused: the request is not served
    rep = log.verify()
    assert not rep.ok and rep.first_bad == 6


def test_a_numbered_insert_is_refused_by_the_chain(pg_url, audit_home):
    log = open_log(pg_url, audit_home)
    fill(log, 2)
    with pytest.raises(sa.exc.IntegrityError, match="record numbers are given by the chain"):
        with log.engine.begin() as c:
            c.execute(
                sa.text("insert into audit_records (seq, ts_us, kind, prev_hash, hash) values (3, 1, 'request', :h, :h)"),
                {"h": "0" * 64},
            )
    assert fill(log, 1, 2) == [3] and log.verify().ok


def test_deleted_head_with_records_left_stops_the_writer(pg_url, audit_home):
    from codemoat.audit.log import AuditUnavailable

    log = open_log(pg_url, audit_home)
    fill(log, 3)
    with log.engine.begin() as c:
        c.execute(sa.text("delete from audit_head"))
    with pytest.raises(AuditUnavailable, match="signed head is missing"):
        log.append("request", user="bob")
    assert not log.verify().ok


def test_connection_dropped_by_the_server_is_replaced(pg_url, audit_home):
    log = open_log(pg_url, audit_home)
    fill(log, 3)
    pid = log._pg._conn.info.backend_pid
    with log.engine.connect() as c:  # what a PostgreSQL restart or failover does to the writer
        assert c.execute(sa.text("select pg_terminate_backend(:p)"), {"p": pid}).scalar()
    assert fill(log, 2, 3) == [4, 5]  # tried again on a new connection: nothing had been committed
    assert log._pg._conn.info.backend_pid != pid
    rep = log.verify()
    assert rep.ok and rep.records == 5, rep.problem


def test_a_flush_whose_answer_is_lost_after_it_committed_is_not_written_twice(pg_url, audit_home, monkeypatch):
    import psycopg

    log = open_log(pg_url, audit_home)
    fill(log, 2)
    conn = log._pg._conn
    real = conn.execute

    class LostAnswer:
        def execute(self, *a, **kw):  # the INSERT commits, then the connection dies before the answer is read
            real(*a, **kw).fetchall()
            conn.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")

        def __getattr__(self, name):
            return getattr(conn, name)

    log._pg._conn = LostAnswer()
    assert fill(log, 1, 2) == [3]  # read back as committed: the caller gets its record's number
    assert fill(log, 1, 3) == [4]  # and the writer carries on with a new connection
    rep = log.verify()
    assert rep.ok and rep.records == 4, rep.problem
    assert [r["prompt_tokens"] for r in log.records()] == [0, 1, 2, 3]  # none doubled


def test_an_append_cannot_run_on_the_server_past_the_statement_timeout(pg_url, audit_home):
    """A statement whose connection was lost (waiting on the tip's lock, a synchronous standby) may still commit;
    the server cancels it after `STATEMENT_TIMEOUT_S`, so a record not in the chain by then never will be
    (`serve.late` settles a refused answer's record on that)."""
    from codemoat.audit.pgappend import STATEMENT_TIMEOUT_S

    log = open_log(pg_url, audit_home)
    fill(log, 1)
    shown = log._pg._conn.execute("SHOW statement_timeout").fetchone()[0]
    assert shown == f"{int(STATEMENT_TIMEOUT_S)}s", shown


def _waiting_on_a_lock(engine, other_than: int) -> bool:
    with engine.connect() as c:
        q = "select count(*) from pg_stat_activity where wait_event_type = 'Lock' and pid <> :p and datname = current_database()"
        return bool(c.execute(sa.text(q), {"p": other_than}).scalar())


def _gone(engine, pid: int) -> bool:
    with engine.connect() as c:
        return c.execute(sa.text("select count(*) from pg_stat_activity where pid = :p"), {"p": pid}).scalar() == 0


def test_a_statement_lost_while_it_waits_on_the_tip_cannot_commit_beside_its_retry(pg_cluster, pg_url, audit_home):
    """The network is cut after the INSERT went out, while it waits on the chain's tip (another writer holds it): the
    server does not notice, and the statement would commit once the tip is free. The writer's read-back finds
    nothing yet and retries: before, both committed (the record twice). The lost connection's server process is
    now ended before the read-back (`pgappend._stop`), so only the retry writes it."""
    import threading

    import psycopg

    from waiting import wait_for

    from .test_audit_sign_after_commit import CuttingProxy

    proxy = CuttingProxy(pg_cluster.port)
    proxy.after_send, proxy.keep_listening = True, True
    log = open_log(pg_url.replace(f":{pg_cluster.port}/", f":{proxy.port}/"), audit_home)
    try:
        fill(log, 2)
        lost = log._pg._ident[0]
        with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=False) as blocker:
            blocker.execute("SELECT * FROM audit_tip FOR UPDATE")  # another writer's turn on the tip
            proxy.armed = True
            got: list = []
            t = threading.Thread(target=lambda: got.append(fill(log, 1, 2)), daemon=True)
            t.start()
            assert proxy.cut_done.wait(10)
            # the retry waits on the tip, and the lost statement's process is gone (ended before the read-back)
            assert wait_for(lambda: _waiting_on_a_lock(log.engine, lost) and _gone(log.engine, lost), 20)
            blocker.rollback()
        t.join(30)
        assert got == [[3]]
        assert [r["prompt_tokens"] for r in log.records()] == [0, 1, 2]
        assert log.verify().ok
    finally:
        proxy.close()


def test_a_lost_statement_the_writer_could_not_end_then_is_ended_before_the_next_append(pg_cluster, pg_url, audit_home):
    """The same cut, and the server unreachable for the read-back too: the append fails (a 503; a stream's record is
    kept to be written later), and the lost statement still waits on the tip. The writer ends it before it appends
    or looks up anything else (`PgAppender.stop_lost`): a kept record written later cannot sit beside it."""
    import threading

    import psycopg

    from codemoat.audit.log import AuditUnavailable
    from waiting import wait_for

    from .test_audit_sign_after_commit import CuttingProxy

    proxy = CuttingProxy(pg_cluster.port)
    proxy.after_send = True  # and stops listening: the read-back cannot connect
    log = open_log(pg_url.replace(f":{pg_cluster.port}/", f":{proxy.port}/"), audit_home)
    direct = sa.create_engine(pg_url)  # the test's own view of the server, not through the proxy
    try:
        fill(log, 2)
        lost = log._pg._ident[0]
        with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=False) as blocker:
            blocker.execute("SELECT * FROM audit_tip FOR UPDATE")
            proxy.armed = True
            failed: list = []

            def first() -> None:
                try:
                    fill(log, 1, 2)
                except AuditUnavailable as e:
                    failed.append(e)

            t = threading.Thread(target=first, daemon=True)
            t.start()
            t.join(30)
            assert failed and not _gone(direct, lost), "the lost statement should still wait on the tip"
            proxy.resume()
            assert wait_for(lambda: log.check_writable(max_age=0), 20)
            assert log.written_as(0, "0" * 64) is None  # a look-up ends the lost statement first
            assert _gone(direct, lost)
            blocker.rollback()
        assert fill(log, 1, 3) == [3]
        assert [r["prompt_tokens"] for r in log.records()] == [0, 1, 3]  # the refused one is not in the chain
        assert log.verify().ok
    finally:
        proxy.close()
        direct.dispose()
