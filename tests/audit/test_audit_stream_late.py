"""A streamed answer whose audit record the log does not take when it ends (the database went away while it
streamed; the answer was delivered as it came) is not left unrecorded: its record is kept and written once
the log takes records again (`serve/late.py`), in the real app on a real llama.cpp engine.

The database refuses the record deterministically: a SQLite trigger on `audit_records` inserts writes into a
table that is then dropped ("no such table", as for a log whose table went away; a trigger's RAISE would be a
constraint error, which the writer rightly takes for a forged record). The writability check before a request
(an empty write transaction) still passes, the record at the stream's end does not."""

from __future__ import annotations

import json
import logging
import sqlite3

from waiting import wait_for

from codemoat.config import Settings

from .test_audit_trust import client_for, complete
from .trustapp import records, tiny_llm

llm = tiny_llm  # the module's engine (trustapp)


def refuse_records(con: sqlite3.Connection) -> None:
    con.execute("CREATE TABLE gone (x)")
    con.execute("CREATE TRIGGER refuse_records BEFORE INSERT ON audit_records BEGIN INSERT INTO gone VALUES (1); END")
    con.execute("DROP TABLE gone")
    con.commit()


def streamed(c, headers, prompt="def add(a, b):", max_tokens=6):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    return c.post("/v1/completions", json=body, headers=headers)


def detail(r: dict) -> dict:
    d = r.get("detail")
    return json.loads(d) if isinstance(d, str) else (d or {})


def test_a_delivered_stream_whose_record_the_log_refused_is_recorded_once_it_takes_records_again(
    audit_home, engine, accounts, tokens, llm, caplog
):
    caplog.set_level(logging.ERROR, logger="codemoat.audit")
    with client_for(Settings(), accounts, llm) as c:
        trust = c.app.state.trust
        assert complete(c, tokens["alice"]).status_code == 200
        before = len(records(engine))
        con = sqlite3.connect(audit_home / "codemoat.db")
        refuse_records(con)
        r = streamed(c, tokens["alice"])
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")  # delivered whole
        assert len(trust.late) == 1 and len(records(engine)) == before  # not written, but kept
        assert "kept to be written once it takes records again" in caplog.text and "def add" not in caplog.text
        # a whole answer is still held and refused while the log does not take records: nothing kept for it
        assert wait_for(lambda: trust.log.known_writable)  # the probe's empty transaction passes the trigger
        r = complete(c, tokens["bob"])
        assert r.status_code == 503 and len(trust.late) == 1
        con.execute("DROP TRIGGER refuse_records")
        con.commit()
        con.close()
        assert wait_for(lambda: trust.log.known_writable)
        assert complete(c, tokens["bob"]).status_code == 200  # finds the log writable: the kept record goes first
        assert wait_for(lambda: len(trust.late) == 0)
        late = [x for x in records(engine) if detail(x).get("late")]
        assert len(late) == 1
        rec = late[0]
        assert rec["user"] == "alice" and rec["route"] == "/v1/completions" and rec["status"] == 200
        assert rec["completion_tokens"] > 0 and rec["prompt_tokens"] > 0
        assert trust.log.verify().ok  # one chain: the late record at its tip


def test_a_record_still_kept_at_shutdown_is_logged_on_one_line_without_its_text(
    audit_home, engine, accounts, tokens, llm, caplog
):
    caplog.set_level(logging.ERROR, logger="codemoat.audit")
    with client_for(Settings(), accounts, llm) as c:
        trust = c.app.state.trust
        assert complete(c, tokens["alice"]).status_code == 200
        con = sqlite3.connect(audit_home / "codemoat.db")
        refuse_records(con)
        con.close()
        assert streamed(c, tokens["alice"], prompt="password = 'hunter2-secret'").status_code == 200
        assert len(trust.late) == 1
    lines = [m for m in caplog.messages if "never took" in m]
    assert len(lines) == 1 and "'alice'" in lines[0] and "/v1/completions" in lines[0]
    assert "hunter2" not in caplog.text  # the prompt's text is never logged
    assert len(trust.late) == 0
