"""`AuditLog.append_async` (audit.writer): an event loop's records written together by one thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from sqlalchemy import event

from codemoat.audit.log import AuditUnavailable


def test_concurrent_async_appends_share_commits_and_wake_the_loop_once_per_batch(audit_log, engine):
    """32 requests on one loop ending at once: each gets its own seq once committed, the chain
    verifies, the records went in a few transactions, and each batch woke the loop once (not once
    per record, as a worker thread per request does)."""
    commits: list[int] = []
    event.listen(engine, "commit", lambda conn: commits.append(1))
    wakes: list[int] = []

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counted(cb, *args, **kw):
            if threading.current_thread().name == "audit-writer":
                wakes.append(len(args[0]))
            return real(cb, *args, **kw)

        loop.call_soon_threadsafe = counted
        return await asyncio.gather(
            *(audit_log.append_async("request", user=f"u{i}", route="/v1/completions", status=200) for i in range(32))
        )

    seqs = asyncio.run(main())
    assert sorted(seqs) == list(range(1, 33))
    assert audit_log.verify().ok
    assert sum(wakes) == 32 and len(wakes) < 32, wakes
    assert len(commits) < 32
    assert [r["user"] for r in audit_log.records()] == [f"u{i}" for i in range(32)]  # in the order they were queued


def test_then_runs_after_the_commit_and_its_error_never_fails_the_record(audit_log):
    seen: list[int] = []

    def then() -> None:
        seen.append(audit_log.count())  # the record is in the database already
        raise RuntimeError("a metric went wrong")

    async def main() -> int:
        return await audit_log.append_async("request", user="alice", status=200, then=then)

    assert asyncio.run(main()) == 1
    assert seen == [1]


def test_a_failed_batch_answers_every_waiter_and_the_writer_goes_on(audit_log, monkeypatch):
    """A batch that cannot be written is AuditUnavailable (a 503) for every request in it; the next one is written."""
    real = audit_log._append_locked

    def broken(rows, batch):
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(audit_log, "_append_locked", broken)

    async def many() -> list[object]:
        return await asyncio.gather(
            *(audit_log.append_async("request", user=f"u{i}", status=200) for i in range(4)), return_exceptions=True
        )

    got = asyncio.run(many())
    assert all(isinstance(e, AuditUnavailable) for e in got), got
    monkeypatch.setattr(audit_log, "_append_locked", real)

    async def one() -> int:
        return await audit_log.append_async("request", user="bob", status=200)

    assert asyncio.run(one()) == 1
    assert audit_log.verify().ok


def test_close_writes_what_is_queued_and_stops_the_thread(audit_log):
    async def main() -> int:
        return await audit_log.append_async("request", user="alice", status=200)

    assert asyncio.run(main()) == 1
    writer = audit_log._writer._thread
    assert writer is not None and writer.is_alive()
    audit_log.close()
    writer.join(timeout=10)
    assert not writer.is_alive()
    assert asyncio.run(main()) == 2  # a later append starts another


def test_the_writer_thread_survives_a_bug_and_every_waiter_gets_an_answer(audit_log, monkeypatch):
    """Anything the writer did not foresee is AuditUnavailable for the batch's requests, not a thread that
    died and leaves every later request waiting for its record for good."""
    real = audit_log._flush

    def bug(batch):
        raise RuntimeError("a bug")

    monkeypatch.setattr(audit_log, "_flush", bug)

    async def one(user: str) -> int:
        return await asyncio.wait_for(audit_log.append_async("request", user=user, status=200), 10)

    with pytest.raises(AuditUnavailable, match="RuntimeError"):
        asyncio.run(one("alice"))
    monkeypatch.setattr(audit_log, "_flush", real)
    assert asyncio.run(one("bob")) == 1


def test_close_returns_only_once_the_queued_records_are_written_and_signed(audit_log, monkeypatch):
    """Records still queued for the writer when the log closes (serve's shutdown, interpreter exit) are
    written and covered by close()'s signature before close() returns: before, close() only queued the
    writer's stop, signed the head as it stood and returned, so a queued record was written after the
    closing signature (left unsigned), or never (the daemon thread dies with the process)."""
    real = audit_log._flush
    first_in, closing, closed = threading.Event(), threading.Event(), threading.Event()
    calls: list[int] = []

    def slow(batch):
        calls.append(len(batch))
        if len(calls) == 1:  # alice's batch: held until bob's record is queued behind it and close() began
            first_in.set()
            closing.wait(10)
        else:  # bob's batch: held until close() returns (or 3 s, for a close() that waits for it)
            closed.wait(3)
        real(batch)

    monkeypatch.setattr(audit_log, "_flush", slow)
    results: list[object] = []

    async def two() -> None:
        a = asyncio.ensure_future(audit_log.append_async("request", user="alice", status=200))
        await asyncio.to_thread(first_in.wait, 10)
        b = asyncio.ensure_future(audit_log.append_async("request", user="bob", status=200))
        results.extend(await asyncio.gather(a, b, return_exceptions=True))

    loop_thread = threading.Thread(target=asyncio.run, args=(two(),))
    loop_thread.start()
    assert first_in.wait(10)
    while audit_log._writer._queue.qsize() == 0:  # bob's record queued behind alice's batch
        time.sleep(0.01)
    real_stop = audit_log._writer.stop

    def stop() -> None:
        real_stop()
        closing.set()

    monkeypatch.setattr(audit_log._writer, "stop", stop)
    audit_log.close()
    written = audit_log.count()
    signed = audit_log._signed_seq
    closed.set()
    loop_thread.join(20)
    assert results == [1, 2]
    assert written == 2, "close() returned before the queued record was written"
    assert signed == 2, "close()'s signature does not cover the queued record"


def test_a_record_queued_while_the_log_closes_is_still_written(audit_log, monkeypatch):
    """A request whose record is queued just as the log closes (its `submit` saw the running writer, then
    `close()` stopped it before the record was in the queue) still gets its record written and its answer:
    before, the record went in behind the writer's stop, the thread ended without reading it, and the
    request waited for good (shielded in the audit middleware)."""

    async def one(user: str) -> int:
        return await asyncio.wait_for(audit_log.append_async("request", user=user, status=200), 10)

    assert asyncio.run(one("alice")) == 1  # the writer runs
    writer = audit_log._writer
    real_put, none_in = writer._queue.put, threading.Event()

    class Late:
        """The writer's queue, with bob's put held until close() queued the writer's stop (as if his thread
        lost the CPU there); a `submit` that holds the writer's lock meanwhile makes close() wait instead."""

        def __getattr__(self, name):
            return getattr(real_queue, name)

        def put(self, item):
            if item is None:
                real_put(item)
                none_in.set()
            else:
                none_in.wait(3)
                real_put(item)

    real_queue = writer._queue
    monkeypatch.setattr(writer, "_queue", Late())
    closer = threading.Thread(target=lambda: (time.sleep(0.2), audit_log.close()))
    closer.start()
    try:
        assert asyncio.run(one("bob")) == 2
    finally:
        closer.join(20)
    assert [r["user"] for r in audit_log.records()] == ["alice", "bob"]


def test_a_record_being_written_at_interpreter_exit_is_written(tmp_path):
    """A process that exits while the writer thread writes a request's record (serve's last requests as it
    stops) still writes it, and signs it: before, no exit handler waited for the daemon writer thread (the
    head timer's handler is armed only once a record is written), so the record was lost."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    code = f"""
import asyncio, threading, time
from codemoat.db import open_db
from codemoat.audit.log import AuditLog
lg = AuditLog(open_db({url!r}))
real, inside = lg._flush, threading.Event()
def slow(batch):
    inside.set()
    time.sleep(0.5)
    real(batch)
lg._flush = slow
threading.Thread(target=lambda: asyncio.run(lg.append_async("request", user="alice", status=200)), daemon=True).start()
assert inside.wait(10)
"""  # the main thread ends here, the record half written
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    from codemoat.audit.log import AuditLog
    from codemoat.db import open_db

    eng = open_db(url)
    try:
        lg = AuditLog(eng)
        assert [r["user"] for r in lg.records()] == ["alice"]
        assert lg.verify().ok
    finally:
        eng.dispose()


def _queued_together(log, records: list[dict]) -> list[object]:
    """Append `records` from one loop so that they wait for the writer together: it takes a first record
    and waits for the log's lock (held here) while these queue. What each append returned or raised."""

    async def main() -> list[object]:
        log._lock.acquire()
        try:
            first = asyncio.ensure_future(log.append_async("request", user="first", status=200))
            while not log._writer._queue.empty() or log._writer._thread is None:
                await asyncio.sleep(0.01)
            rest = [asyncio.ensure_future(log.append_async("request", **r)) for r in records]
            await asyncio.sleep(0.05)  # each is submitted from the loop
        finally:
            log._lock.release()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    return asyncio.run(main())[1:]


def test_a_record_the_database_refuses_costs_only_its_own_request(database_url, audit_home):
    """One record whose value the database refuses (an integer past its column: PostgreSQL's int4,
    SQLite's 64 bits), group-committed with seven others: before, all eight got AuditUnavailable (a 503
    for every request in the batch) and the log was marked unavailable. Now the batch is written record
    by record: the seven are written, only the refused one is an error, the log stays writable and the
    chain verifies. (No request field an attacker controls reaches the database unchecked today: texts
    lose NULs and lone surrogates and are cut to their columns (audit.rows); integers are the server's
    own counts. This bounds what the next such field can do.)"""
    from .logs import open_log

    log = open_log(database_url, audit_home)
    bad = 2**70 if database_url.startswith("sqlite") else 2**40
    got = _queued_together(log, [dict(user=f"u{i}", status=200, prompt_tokens=bad if i == 3 else i) for i in range(8)])
    refused = got[3]
    assert isinstance(refused, AuditUnavailable) and "refused" in str(refused), got
    assert sorted(x for x in got if not isinstance(x, BaseException)) == [2, 3, 4, 5, 6, 7, 8], got
    assert [r["user"] for r in log.records()] == ["first", "u0", "u1", "u2", "u4", "u5", "u6", "u7"]
    assert log.known_writable and log.failure is None
    assert log.verify().ok
    log.close()


def test_a_group_commit_carries_a_bounded_amount_of_text(audit_log, engine, monkeypatch):
    """With `audit.retain_text`, each record carries its prompt (up to server.max_body_mb, 8 MiB): 256 of
    them queued together made one 2 GiB transaction, past the 1 GB PostgreSQL takes in one message, and
    a refused batch is a 503 for every request in it. A commit now stops taking records once it carries
    MAX_BATCH_CHARS of text (scaled down here: 1,000 characters, records of 600)."""
    from codemoat.audit import heads

    monkeypatch.setattr(heads, "MAX_BATCH_CHARS", 1000)
    commits: list[int] = []
    event.listen(engine, "commit", lambda conn: commits.append(1))
    got = _queued_together(audit_log, [dict(user=f"u{i}", status=200, prompt_text="p" * 600) for i in range(6)])
    assert got == [2, 3, 4, 5, 6, 7]
    assert len(commits) == 1 + 3, commits  # the first record's, then two records per commit
    assert audit_log.verify().ok


def test_a_thread_append_returns_only_once_its_own_record_is_written(database_url, audit_home, monkeypatch):
    """`append` (a worker thread's: every request record that retains text goes this way) flushes what is
    queued from the front, one batch of at most MAX_BATCH_CHARS of text. Fails before: when other threads'
    records queued ahead of it filled that batch (two here, stand-ins for threads preempted between queueing
    their record and taking the lock), its own record was left queued, and append returned 0 without an
    error: the request was served before its record was written, if it ever was."""
    from codemoat.audit import heads
    from codemoat.audit.pending import Pending
    from codemoat.audit.rows import normalise

    from .logs import open_log

    audit_log = open_log(database_url, audit_home)
    monkeypatch.setattr(heads, "MAX_BATCH_CHARS", 1000)
    ahead = [Pending(normalise("request", dict(user=f"u{i}", status=200, prompt_text="p" * 600))) for i in range(2)]
    audit_log._pending.extend(ahead)
    seq = audit_log.append("request", user="me", status=200, prompt_text="p" * 600)
    assert [(r["user"], r["seq"]) for r in audit_log.records()] == [("u0", 1), ("u1", 2), ("me", 3)]
    assert seq == 3 and all(w.done and w.error is None for w in ahead) and not audit_log._pending
    assert audit_log.verify().ok
    audit_log.close()


def test_a_log_nobody_holds_is_collected_and_its_writer_thread_ends(engine, audit_home, db_url):
    """The writer thread holds the log weakly, so a log nobody uses is collected (and its thread ends); but its
    last batch stayed in the thread's frame while it waited for the next, and a record's `then` (the trust
    layer's, holding the log) kept the log, its head file and its connections alive for good."""
    import functools
    import gc
    import weakref

    from codemoat.audit.log import AuditLog, head_file_for
    from waiting import wait_for

    lg = AuditLog(engine, head_file=head_file_for(db_url, audit_home))
    then = functools.partial(getattr, lg, "sign_every")  # holds the log, as the trust layer's `then` does
    asyncio.run(lg.append_async("request", user="alice", status=200, then=then))
    thread, ref = lg._writer._thread, weakref.ref(lg)
    assert thread.is_alive()  # the writer waits for the next batch
    del lg, then
    assert wait_for(lambda: gc.collect() is not None and ref() is None), "the writer thread kept the log"
    assert wait_for(lambda: not thread.is_alive())
