"""The PostgreSQL append path (`audit.pgappend`: two network flushes, one with the head locked):
the same chain as the portable path, interleaved with it; tamper evidence on the writer's side
(a record slipped in beyond the head, a deleted head); a writer whose connection the server
dropped carries on without a lost or doubled record."""

from __future__ import annotations

import pytest
import sqlalchemy as sa


@pytest.fixture
def pg_url(request, audit_home):
    cluster = request.getfixturevalue("pg_cluster")
    url = cluster.new_database()
    yield url
    cluster.drop_database(url)


def _log(url, home, **kw):
    from codemoat.audit.log import AuditLog, head_file_for
    from codemoat.db import open_db

    return AuditLog(open_db(url), checkpoint_every=10, head_file=head_file_for(url, home), **kw)


def _fill(log, n, start=0):
    return [log.append("request", user="alice", route="/v1/completions", status=200, prompt_tokens=start + i) for i in range(n)]


def test_pipeline_and_portable_writers_make_one_chain(pg_url, audit_home):
    fast, portable = _log(pg_url, audit_home), _log(pg_url, audit_home, pg_pipeline=False)
    assert fast._pg is not None and portable._pg is None
    seqs = _fill(fast, 25) + _fill(portable, 7, 25) + _fill(fast, 8, 32)
    assert seqs == list(range(1, 41))
    rep = fast.verify()
    assert rep.ok, rep.problem
    assert (rep.records, rep.checkpoints, rep.head_seq) == (40, 4, 40)
    assert [r["prompt_tokens"] for r in fast.records()] == list(range(40))


def test_group_commit_of_many_threads_on_one_connection(pg_url, audit_home):
    import threading

    log = _log(pg_url, audit_home)
    ts = [threading.Thread(target=_fill, args=(log, 30, i * 100)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    rep = log.verify()
    assert rep.ok and rep.records == 240, rep.problem


def test_record_slipped_in_beyond_the_head_stops_the_writer(pg_url, audit_home):
    from codemoat.audit.log import AuditUnavailable

    log = _log(pg_url, audit_home)
    _fill(log, 5)
    with log.engine.begin() as c:  # a copy of record 5 as record 6, without the signing key
        c.execute(
            sa.text(
                'insert into audit_records select 6, ts_us, kind, "user", token_id, route, protocol, model, repos, '
                "snippets, prompt_tokens, completion_tokens, latency_ms, status, client, prompt_text, completion_text, "
                "detail, hash, hash from audit_records where seq = 5"
            )
        )
    with pytest.raises(AuditUnavailable, match="tampered: record 6 exists beyond the signed head"):
        log.append("request", user="bob")
    assert not log.check_writable()  # the writer stays refused: the request is not served
    rep = log.verify()
    assert not rep.ok and rep.first_bad == 6


def test_deleted_head_with_records_left_stops_the_writer(pg_url, audit_home):
    from codemoat.audit.log import AuditUnavailable

    log = _log(pg_url, audit_home)
    _fill(log, 3)
    with log.engine.begin() as c:
        c.execute(sa.text("delete from audit_head"))
    with pytest.raises(AuditUnavailable, match="signed head is missing"):
        log.append("request", user="bob")
    with log.engine.connect() as c:
        assert c.execute(sa.text("select count(*) from audit_records")).scalar() == 3  # nothing written


def test_connection_dropped_by_the_server_is_replaced(pg_url, audit_home):
    log = _log(pg_url, audit_home)
    _fill(log, 3)
    pid = log._pg._raw.driver_connection.info.backend_pid
    with log.engine.connect() as c:  # what a PostgreSQL restart or failover does to the writer
        assert c.execute(sa.text("select pg_terminate_backend(:p)"), {"p": pid}).scalar()
    assert _fill(log, 2, 3) == [4, 5]  # tried again on a new connection: nothing had been sent
    assert log._pg._raw.driver_connection.info.backend_pid != pid
    rep = log.verify()
    assert rep.ok and rep.records == 5, rep.problem
