"""Kept stream records (`serve/late.py`) are written once each, though two drains may run at once: the one
the next request starts in the background (`start`) and the last try at shutdown (`drain`). The shutdown
drain read the same oldest record while the background one was still writing it, and wrote it again: the
same request twice in the audit log, with its usage row and quota counted twice.

Made deterministic without timing: another connection holds SQLite's write lock while the background
drain's append waits in the writer, the shutdown drain starts, then the lock is released."""

from __future__ import annotations

import asyncio
import sqlite3

from codemoat.audit.log import AuditUnavailable
from codemoat.serve.late import LateRecords

from .logs import open_log


def _requests(db: str) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT user, kind FROM audit_records WHERE kind = 'request'").fetchall()


def test_a_kept_record_is_written_once_when_shutdown_drains_beside_the_background_drain(db_url, audit_home):
    log = open_log(db_url, audit_home)
    db = str(audit_home / "codemoat.db")
    log.append("request", user="bob", route="/v1/completions", status=200)  # the tables exist
    after: list[int] = []
    late = LateRecords(log.append_async)
    late.keep(
        {"user": "alice", "route": "/v1/completions", "status": 200, "detail": {"method": "POST"}},
        lambda: after.append(1),
        AuditUnavailable("the database went away"),
    )
    holder = sqlite3.connect(db, isolation_level=None, timeout=60)

    async def both() -> list[bool]:
        holder.execute("BEGIN IMMEDIATE")  # the writer's append waits here (its busy timeout: 10 s)
        try:
            late.start()  # the next request's background drain: its append is queued for the writer
            await asyncio.sleep(0)  # one turn of the loop: the task runs up to its wait (no timing)
            last = asyncio.create_task(late.drain())  # shutdown's last try, while that append waits
            await asyncio.sleep(0)
        finally:
            holder.execute("ROLLBACK")
        return [await last, await late._task]

    try:
        assert asyncio.run(both()) == [True, True]
        assert len(late) == 0
        assert [u for u, _ in _requests(db)] == ["bob", "alice"]  # alice's record once, not twice
        assert after == [1]  # her usage and quota counted once
        assert log.verify().ok
    finally:
        holder.close()
        log.close()


def test_a_drain_that_finds_the_log_still_down_keeps_the_record(db_url, audit_home):
    """The negative: a drain whose append is not taken leaves the record kept (for the next request or the
    shutdown's error line), and writes it once the log takes records again."""
    log = open_log(db_url, audit_home)
    db = str(audit_home / "codemoat.db")
    log.append("request", user="bob", route="/v1/completions", status=200)
    late = LateRecords(log.append_async)
    late.keep({"user": "alice", "route": "/v1/completions", "status": 200, "detail": {}}, lambda: None, AuditUnavailable("x"))
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE gone (x)")
    con.execute("CREATE TRIGGER refuse BEFORE INSERT ON audit_records BEGIN INSERT INTO gone VALUES (1); END")
    con.execute("DROP TABLE gone")
    con.commit()
    try:
        assert asyncio.run(late.drain()) is False
        assert len(late) == 1 and [u for u, _ in _requests(db)] == ["bob"]
        con.execute("DROP TRIGGER refuse")
        con.commit()
        assert log.check_writable(max_age=0)
        assert asyncio.run(late.drain()) is True
        assert len(late) == 0 and [u for u, _ in _requests(db)] == ["bob", "alice"]
    finally:
        con.close()
        log.close()


def test_kept_records_are_bounded_by_their_text_as_well_as_their_number(caplog):
    """A kept record holds its request (the prompt as sent): a database out of disk admits every stream, so the
    records kept are bounded by the characters of text they hold too, the oldest dropped with an error line."""
    written: list[str] = []

    async def write(kind: str, then=None, **fields) -> int:
        written.append(fields["user"])
        return len(written)

    late = LateRecords(write, max_kept=3, max_chars=100)
    why = AuditUnavailable("the database is out of disk")
    for i, chars in enumerate((40, 40, 40)):  # the third puts 120 characters past the 100
        late.keep({"user": f"u{i}", "route": "/v1/completions", "status": 200, "detail": {}}, lambda: None, why, chars)
    assert len(late) == 2 and "the oldest is dropped" in caplog.text and "'u0'" in caplog.text
    for i in range(3, 6):  # and by number: at most 3, however little text
        late.keep({"user": f"u{i}", "route": "/v1/completions", "status": 200, "detail": {}}, lambda: None, why, 0)
    assert len(late) == 3
    assert asyncio.run(late.drain()) is True
    assert written == ["u3", "u4", "u5"] and len(late) == 0
    # the newest alone is kept whatever its size: it is what the last request delivered
    late.keep({"user": "big", "route": "/v1/completions", "status": 200, "detail": {}}, lambda: None, why, 1000)
    assert len(late) == 1
