"""`LateRecords.doubt` bookkeeping (`serve/late.py`), on a real audit log on PostgreSQL: what is kept of a refused
answer (no text), how many, what shutdown says of them, and a `withheld` record whose own append was lost after
it committed, which must not be written twice."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from codemoat.audit.log import AuditUnavailable
from codemoat.serve.late import LateRecords

from .logs import open_log

SECRET = "sk-live-0123456789abcdef0123456789abcdef"


def _fields(i: int = 0) -> dict:
    return {
        "ts": time.time() + i * 1e-3,
        "user": "alice",
        "token_id": "t1",
        "route": "/v1/completions",
        "status": 200,
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "prompt_text": f"def f(): return '{SECRET}'",
        "completion_text": "pass",
        "detail": {"method": "POST"},
    }


def _late(log, write=None, **kw) -> LateRecords:
    return LateRecords(
        write or log.append_async, written=log.written_already, written_as=log.written_as, fingerprint=log.fingerprint, **kw
    )


def test_doubts_keep_no_text_are_bounded_and_named_at_shutdown(pg_url, audit_home, caplog):
    caplog.set_level(logging.ERROR, logger="codemoat.audit")
    log = open_log(pg_url, audit_home)
    late = _late(log, max_kept=3)
    for i in range(5):
        late.doubt(_fields(i))
    assert late.doubts == 3
    assert SECRET not in repr(list(late._doubts))  # its time and body hash find it; its text is not needed
    assert caplog.text.count("refused answers' records to look up: the oldest is not") == 2
    caplog.clear()
    late.give_up()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("user 'alice', /v1/completions, status 200" in x for x in lines)
    assert SECRET not in caplog.text and late.doubts == 0


def test_a_withheld_record_whose_append_was_lost_after_it_committed_is_written_once(pg_url, audit_home):
    log = open_log(pg_url, audit_home)
    fields = _fields()
    seq = log.append("request", **fields)  # committed; its writer was told it failed (the 503 went out)
    lost: list[int] = []

    async def write(kind: str, **kw):
        got = await log.append_async(kind, **kw)
        if kind == "withheld" and not lost:  # committed, then the answer to the commit is lost
            lost.append(got)
            raise AuditUnavailable("the connection was lost with the commit's answer")
        return got

    late = _late(log, write)
    late.doubt(fields)
    assert asyncio.run(late.drain()) is False and late.doubts == 1 and lost
    assert asyncio.run(late.drain()) is True and late.doubts == 0
    withheld = list(log.records(kind="withheld"))
    assert len(withheld) == 1, withheld
    detail = withheld[0]["detail"]
    assert (json.loads(detail) if isinstance(detail, str) else detail)["record"] == seq
    assert log.verify().ok
