"""Attacks on audit appends on PostgreSQL (`audit.pgappend`) by a caller who controls what a record
holds (its prompt text, kept when `audit.retain_text` is on; over-long names as defence in depth,
should a caller's value reach a bounded column): a value SQLite takes but PostgreSQL refuses must
not fail the append in the middle of the pipeline (the request unserved, the batch-mates that share
its transaction lost, the log marked failed); and after a failure mid-pipeline the head is where
it was, nothing half-written, the next append continues the chain."""

from __future__ import annotations

import threading

import pytest

from .logs import open_log

HOSTILE = [
    {"model": "m" * 5000},  # longer than the column (256)
    {"model": "gpt\x00-4", "prompt_text": "def f():\x00 pass"},  # a prompt with a NUL: PostgreSQL text cannot hold it
    {"client": "c" * 500, "route": "/" + "r" * 500, "user": "u" * 300},
]


@pytest.mark.parametrize("sign_every", [1, 4], ids=["signed-each", "signed-per-4"])
def test_hostile_field_values_are_recorded_and_do_not_fail_the_batch(pg_url, audit_home, sign_every):
    log = open_log(pg_url, audit_home, sign_every=sign_every)
    log.append("request", user="alice", status=200)
    barrier, errors, seqs = threading.Barrier(len(HOSTILE) + 3), [], []

    def one(fields):
        barrier.wait()
        try:
            seqs.append(log.append("request", status=200, **fields))
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            errors.append(f"{type(e).__name__}: {e}")

    ts = [threading.Thread(target=one, args=(f,)) for f in HOSTILE + [{"user": "bob"}] * 3]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == [] and sorted(seqs) == list(range(2, 2 + len(ts)))
    assert log.known_writable
    log.close()
    rep = log.verify()
    assert rep.ok and rep.records == 1 + len(ts), rep.problem
    rows = {r["seq"]: r for r in log.records()}
    assert "\x00" not in "".join(str(v) for r in rows.values() for v in r.values())
    assert any((r["model"] or "").startswith("gpt") and "4" in r["model"] for r in rows.values())
    assert max(len(r["model"] or "") for r in rows.values()) <= 256


def test_a_failure_in_the_middle_of_the_pipeline_leaves_the_head_and_chain_whole(pg_url, audit_home, monkeypatch):
    from codemoat.audit import pgappend
    from codemoat.audit.log import AuditUnavailable

    log = open_log(pg_url, audit_home)
    for i in range(5):
        log.append("request", user="alice", prompt_tokens=i)
    # the records' INSERT fails on the server (a column it does not have)
    monkeypatch.setattr(pgappend, "_INSERT", pgappend._INSERT.replace('"hash"', '"no_such_column"', 1))
    with pytest.raises(AuditUnavailable):
        log.append("request", user="mallory")
    monkeypatch.undo()
    with log.engine.connect() as c:
        import sqlalchemy as sa

        assert c.execute(sa.text("SELECT seq FROM audit_head")).scalar() == 5
        assert c.execute(sa.text("SELECT seq FROM audit_tip")).scalar() == 5
        assert c.execute(sa.text("SELECT count(*) FROM audit_records")).scalar() == 5
    assert log.append("request", user="alice", prompt_tokens=5) == 6  # the same writer carries on
    rep = log.verify()
    assert rep.ok and rep.records == 6, rep.problem
    assert "mallory" not in {r["user"] for r in log.records()}
