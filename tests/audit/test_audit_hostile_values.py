"""An admin who writes the database and the home puts values no writer would into the audit log's rows and
files: a time that is text or past year 9999, a detail or repos column that is not JSON, JSON nested deeper
than the parser goes, a forged rotation record. `verify` names the problem, `export` still exports every
record (the tampered log is what an investigation needs), and every command answers in one line.

Before: `audit verify` stopped with "error: ValueError: year 148108 is out of range" on a forged unsigned
record (no problem named, no record); `audit export` stopped at an edited record's time or detail, the
records after it never exported; an exported head, the verifier's memory or the outbound log nested
[[[[... stopped `verify` and `outbound` with a RecursionError.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
from conftest import run_cli  # at import: later conftests (tests/vault) take the name `conftest`

from codemoat.audit.chain import FIELDS, body_hash, link_hash

from .logs import fill, open_log

DEEP = "[" * 200_000  # nested far deeper than json.loads goes (a RecursionError, not a ValueError)


@pytest.fixture
def db_file(audit_home):
    return audit_home / "codemoat.db"


def _sql(db_file, stmt: str, *params) -> None:
    con = sqlite3.connect(db_file)
    con.execute(stmt, params)
    con.commit()
    con.close()


def _forge_next(db_file, ts_us) -> int:
    """Append a record that links (SHA-256 needs no key) with time `ts_us`; its seq."""
    con = sqlite3.connect(db_file)
    con.row_factory = sqlite3.Row
    last = dict(con.execute("SELECT * FROM audit_records ORDER BY seq DESC LIMIT 1").fetchone())
    row = {k: None for k in FIELDS} | dict(seq=last["seq"] + 1, ts_us=ts_us, kind="request", user="mallory")
    h = link_hash(row["seq"], last["hash"], body_hash(row))
    con.execute(
        "INSERT INTO audit_records (seq, ts_us, kind, user, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?)",
        (row["seq"], ts_us, "request", "mallory", last["hash"], h),
    )
    con.commit()
    con.close()
    return row["seq"]


def _one_line_failure(r, *needles: str) -> None:
    text = r.stdout + r.stderr
    assert "Traceback" not in text and "RecursionError" not in text and "ValueError" not in text, text
    for n in needles:
        assert n in text, text


@pytest.mark.parametrize("ts_us", [2**62, "abc", 1.5])
def test_a_forged_record_with_a_time_that_is_no_time_is_named_by_verify(audit_log, db_file, ts_us):
    fill(audit_log, 6)
    assert run_cli("audit", "verify").returncode == 0
    seq = _forge_next(db_file, ts_us)
    r = run_cli("audit", "verify", "--json")
    _one_line_failure(r)
    rep = json.loads(r.stdout)
    assert r.returncode == 1 and rep["first_bad"] == seq and "added after the signed head" in rep["problem"], rep
    assert rep["unsigned"] == 1 and rep["unsigned_since"] is None and repr(ts_us) in rep["warning"], rep


def test_export_goes_past_records_whose_stored_values_cannot_be_read(audit_log, db_file):
    fill(audit_log, 8)
    _sql(db_file, "UPDATE audit_records SET ts_us = ?, detail = ?, repos = ? WHERE seq = 3", "abc", "{not json", DEEP[:5000])
    _sql(db_file, "UPDATE audit_records SET ts_us = ?, snippets = ? WHERE seq = 5", 2**62, "=HYPERLINK(1)")
    r = run_cli("audit", "export")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["seq"] for x in rows] == list(range(1, 9))  # every record, the edited ones and those after them
    assert (rows[2]["time"], rows[2]["ts_us"], rows[2]["detail"], rows[2]["repos"]) == ("?", "abc", "{not json", DEEP[:5000])
    assert (rows[4]["time"], rows[4]["snippets"]) == ("?", "=HYPERLINK(1)")
    r = run_cli("audit", "export", "--format", "csv")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 9 and "'=HYPERLINK(1)" in r.stdout, r.stderr
    r = run_cli("audit", "verify")
    _one_line_failure(r, "FAILED at record 3", "edited")
    assert r.returncode == 1


def test_json_nested_too_deep_in_a_head_or_the_outbound_log_is_one_line(audit_log, audit_home, db_url, tmp_path):
    from codemoat.audit.chain import verified_file_for

    fill(audit_log, 3)
    assert run_cli("audit", "verify").returncode == 0
    deep = tmp_path / "deep.json"
    deep.write_text(DEEP)
    r = run_cli("audit", "verify", "--trusted-head", str(deep))
    assert r.returncode == 1 and r.stderr.strip() == f"error: --trusted-head: {deep} is not JSON (damaged?)", r.stderr
    remembered = verified_file_for(db_url, audit_home)
    remembered.write_text(DEEP)
    r = run_cli("audit", "verify")
    _one_line_failure(r, "FAILED at record 1", f"{remembered} is not JSON (damaged?)")
    assert r.returncode == 1
    (audit_home / "outbound.jsonl").write_text('{"method": "POST", "destination": "https://keys.example/lease"}\n' + DEEP + "\n")
    r = run_cli("audit", "outbound", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows[0]["method"] == "POST" and rows[1] == {"line": 2, "raw": DEEP}


@pytest.mark.parametrize("detail", ["[1]", "not json", DEEP[:5000], None])
def test_a_replaced_log_that_begins_with_a_forged_rotation_is_named(audit_log, db_file, detail):
    """The whole chain re-linked (SHA-256 needs no key) from a record 1 that says it is a rotation, with a detail
    no rotation has: the remembered head names the replacement, not a crash on record 1's detail."""
    fill(audit_log, 4)  # no checkpoint yet: only the head and the verifier's memory name the chain
    assert run_cli("audit", "verify").returncode == 0
    con = sqlite3.connect(db_file)
    con.row_factory = sqlite3.Row
    prev = "0" * 64
    for r in [dict(x) for x in con.execute("SELECT * FROM audit_records ORDER BY seq")]:
        if r["seq"] == 1:
            r.update(kind="rotation", detail=detail)
        h = link_hash(r["seq"], prev, body_hash(r))
        con.execute(
            "UPDATE audit_records SET kind = ?, detail = ?, prev_hash = ?, hash = ? WHERE seq = ?",
            (r["kind"], r["detail"], prev, h, r["seq"]),
        )
        prev = h
    con.commit()
    con.close()
    r = run_cli("audit", "verify")
    _one_line_failure(r, "FAILED at record 1", "the log was rotated after", "record 1 archives ? records")
    assert r.returncode == 1


@pytest.mark.parametrize("detail", [DEEP[:5000], 7, b"[1]", '{"rotation": 2}'])
def test_the_signer_reads_any_record_1_detail_as_a_rotation_number(detail):
    """The writers read record 1's rotation number before each head they sign (`heads._first`): a detail a DBA
    wrote there (nested deep, a number SQLite hands back as an int) counts as no number, not a failed signing."""
    from codemoat.audit.heads import rotation_number

    assert rotation_number("rotation", detail) == (2 if detail == '{"rotation": 2}' else 0)


@pytest.mark.parametrize("seq", [None, "7", 1.5, True])
def test_a_head_file_slot_whose_seq_is_no_number_does_not_stop_the_writer(audit_log, seq):
    """Someone writes {"seq": null} over one of the head file's slots. Before: every later append raised TypeError
    (comparing the slots' seqs to pick the older), after its record had committed; now the slot counts as
    damaged, is written over first, and the log verifies again."""
    fill(audit_log, 3)
    raw = audit_log.head_file.read_bytes()
    audit_log.head_file.write_bytes(json.dumps({"seq": seq}).encode().ljust(511) + b"\n" + raw[512:])
    assert "is damaged (slot 0)" in audit_log.verify().problem
    assert fill(audit_log, 2) == [4, 5]
    rep = audit_log.verify()
    assert rep.ok and rep.records == 5 and rep.head_seq == 5, rep.problem


def test_a_rotation_archive_is_private_and_on_disk_before_the_records_are_deleted(audit_log, tmp_path, monkeypatch):
    """When the rotation commits (the records leave the database), the archive holding them is complete, fsynced
    and 0600. Before: it was closed unsynced (a crash after the commit lost the records from both places) and
    made private only after the commit."""
    import hashlib
    import os

    from sqlalchemy import event

    from codemoat.audit import rotate as rotate_mod

    fill(audit_log, 5)
    archive = tmp_path / "archive.jsonl"
    synced, at_commit = [], []
    real_fsync = os.fsync
    monkeypatch.setattr(rotate_mod.os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd))[1])
    old_mask = os.umask(0o022)  # restored below whatever happens

    def on_commit(conn):
        if archive.exists():
            st = archive.stat()
            at_commit.append((st.st_mode & 0o777, st.st_ino in synced, hashlib.sha256(archive.read_bytes()).hexdigest()))

    event.listen(audit_log.engine, "commit", on_commit)
    try:
        detail = audit_log.rotate(archive)
    finally:
        event.remove(audit_log.engine, "commit", on_commit)
        os.umask(old_mask)
    assert at_commit and at_commit[0] == (0o600, True, detail["archive_sha256"]), at_commit
    assert audit_log.verify().ok


@pytest.mark.parametrize("where", ["dangling link", "missing folder"])
def test_a_rotation_to_an_archive_that_cannot_be_created_is_one_line_and_moves_nothing(audit_log, tmp_path, where):
    fill(audit_log, 4)
    archive = tmp_path / "nowhere" / "a.jsonl"
    if where == "dangling link":
        archive = tmp_path / "a.jsonl"
        archive.symlink_to(tmp_path / "elsewhere.jsonl")
    r = run_cli("audit", "rotate", "--archive", str(archive))
    assert r.returncode == 1 and r.stderr.strip().startswith(f"error: cannot create the archive {archive}: "), r.stderr
    assert "Error:" not in r.stderr and not (tmp_path / "elsewhere.jsonl").exists()
    rep = audit_log.verify()
    assert rep.ok and rep.records == 4


def test_a_rotation_the_database_refuses_leaves_no_archive_behind(audit_log, tmp_path, monkeypatch):
    """Was (a reviewer, on the archive made 0600 before the transaction): the database refusing the rotation left
    an empty archive file and an open descriptor, and a retry was "already exists: choose a new archive file". Now
    the archive goes with the refusal, and the same rotation then works."""
    import sqlalchemy.exc

    fill(audit_log, 3)
    archive = tmp_path / "a.jsonl"
    real = audit_log.engine.begin

    def refused():
        raise sqlalchemy.exc.OperationalError("BEGIN", {}, Exception("database is locked"))

    monkeypatch.setattr(audit_log.engine, "begin", refused)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        audit_log.rotate(archive)
    assert not archive.exists()
    monkeypatch.setattr(audit_log.engine, "begin", real)
    assert audit_log.rotate(archive)["records"] == 3 and audit_log.verify().ok
    # a commit that fails after it happened (PostgreSQL's connection lost as it answered): the records left the
    # database, so the archive, their only copy, stays (a second reviewer)
    import contextlib

    fill(audit_log, 2)
    again = tmp_path / "b.jsonl"

    @contextlib.contextmanager
    def lost_after_commit():
        with real() as c:
            yield c
        raise sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(audit_log.engine, "begin", lost_after_commit)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        audit_log.rotate(again)
    kept = [json.loads(line) for line in again.read_text().splitlines()]
    assert sum(1 for e in kept if e["entry"] == "record") == 3  # record 1 (the rotation) and the two after it


def test_on_postgresql_a_dba_record_with_no_time_in_the_tail_is_a_warning_not_a_crash(pg_url, audit_home):
    """On PostgreSQL a few records may follow the signed head (`tail_allowance`): a DBA's insert there, linked by
    the chain's own trigger, with a time past year 9999. Before: verify stopped on it (ValueError); now it is
    the unsigned tail it is, its time named, and the export shows it."""
    import sqlalchemy as sa

    from codemoat.audit.chain import BODY_FIELDS

    log = open_log(pg_url, audit_home)
    fill(log, 3)
    row = {k: None for k in BODY_FIELDS} | dict(ts_us=2**62, kind="request", user="mallory", status=200)
    with log.engine.begin() as c:
        cols = (*BODY_FIELDS, "hash")
        names, params = ", ".join(f'"{k}"' for k in cols), ", ".join(f":{k}" for k in cols)
        c.execute(sa.text(f"INSERT INTO audit_records ({names}) VALUES ({params})"), {**row, "hash": body_hash(row)})
    rep = log.verify()
    assert rep.ok and rep.records == 4 and rep.unsigned == 1 and rep.unsigned_since is None, rep.problem
    assert f"time {2**62}" in rep.warning
    assert [(r["seq"], r["time"]) for r in log.records()][-1] == (4, "?")
    log.close()


@pytest.mark.parametrize("detail", ["[1]", '{"reasons": [1, 2], "signals": 5}', '{"reasons": "ab"}', "not json"])
def test_an_edited_alert_does_not_hide_the_others(audit_log, db_file, detail):
    """`audit alerts` lists every alert though someone rewrote one's detail in the database (before: AttributeError or
    TypeError, and no alert listed at all)."""
    audit_log.append("alert", user="bob", detail={"reasons": ["novelty"], "signals": {"requests": 40}})
    audit_log.append("alert", user="carol", detail={"reasons": ["volume"]})
    _sql(db_file, "UPDATE audit_records SET detail = ? WHERE seq = 2", detail)
    r = run_cli("audit", "alerts")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "record 1" in r.stdout and "user bob: novelty" in r.stdout and "requests in window 40" in r.stdout
    assert "record 2" in r.stdout and "user carol:" in r.stdout


def test_paths_with_brackets_are_printed_as_they_are(audit_log, audit_home, tmp_path):
    """A path holding `[/]` or `[bold]` (a folder someone named so, the operator's --trusted-head or --archive) is
    printed as it is. Before: verify's failure line ran it as rich markup (MarkupError instead of the problem, or
    a different path shown), and so did head export's and rotate's lines."""
    fill(audit_log, 3)
    folder = tmp_path / "x["
    folder.mkdir()
    head = folder / "]y[bold].json"
    r = run_cli("audit", "head", "export", "-o", str(head))
    assert r.returncode == 0 and f"written to {head}:" in r.stdout, r.stdout + r.stderr
    doc = json.loads(head.read_text())
    forged = folder / "]forged[b].json"
    forged.write_text(json.dumps({**doc, "signature": "00" * 64}))
    r = run_cli("audit", "verify", "--trusted-head", str(forged))
    assert r.returncode == 1 and r.stderr == "", r.stderr
    assert r.stdout.strip() == f"audit log FAILED at record 1: the exported head {forged} has an invalid signature"
    archive = folder / "]archive[b].jsonl"
    r = run_cli("audit", "rotate", "--archive", str(archive))
    assert r.returncode == 0 and f"moved 3 records to {archive} (sha256" in r.stdout, r.stdout + r.stderr


def _victim(tmp_path):
    v = tmp_path / "victim.txt"
    v.write_text("precious\n")
    return v


def test_the_verifiers_memory_is_never_written_through_a_link_at_its_temporary_name(audit_log, audit_home, db_url, tmp_path):
    """Whoever writes the home links audit-verified-<db>.json.tmp to a file the verifier (root, say) may write.
    Before: `audit verify` wrote the head over that file, then renamed the link into the memory's place."""
    from codemoat.audit.chain import verified_file_for

    fill(audit_log, 3)
    memory, victim = verified_file_for(db_url, audit_home), _victim(tmp_path)
    memory.with_name(memory.name + ".tmp").symlink_to(victim)
    r = run_cli("audit", "verify", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["warning"] is None, r.stdout + r.stderr
    assert victim.read_text() == "precious\n"
    assert not memory.is_symlink() and json.loads(memory.read_text())["seq"] == 3
    assert not memory.with_name(memory.name + ".tmp").exists()


def test_the_writer_never_writes_its_head_through_a_link(audit_log, tmp_path):
    """The head file replaced by a link to another file. Before: every signed head was written into that file's first
    1 KiB (the writer even said, reading it back, that it is a link); now the head copy is not written, the
    appends go on, and verify names the link."""
    victim = _victim(tmp_path)
    audit_log.head_file.symlink_to(victim)  # before the first head: the writer has no descriptor on it yet
    assert fill(audit_log, 3) == [1, 2, 3]
    assert victim.read_text() == "precious\n"
    rep = audit_log.verify()
    assert not rep.ok and "is a symbolic link" in rep.problem, rep.problem


def test_a_rotation_does_not_truncate_the_file_a_head_file_link_names(audit_log, tmp_path):
    """`audit rotate` (run by an admin, perhaps root) empties the head file: a link put at its name is left alone.
    Before: the file it named was truncated, then the new chain's head written into it."""
    fill(audit_log, 3)
    victim = _victim(tmp_path)
    audit_log.close()  # the running writer's descriptor closed: the next write opens the name again
    audit_log.head_file.unlink()
    audit_log.head_file.symlink_to(victim)
    r = run_cli("audit", "rotate", "--archive", str(tmp_path / "a.jsonl"))
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("detail", ["[1]", '"text"', DEEP[:5000]])
def test_a_tpm_checkpoint_record_whose_detail_is_no_object_is_named(audit_log, detail):
    """A DBA's record of kind tpm_checkpoint (on PostgreSQL the chain's trigger links it, the next append signs over
    it) whose detail is a list, a string, or nested past the parser. Before: verify on a TPM machine stopped with
    AttributeError or RecursionError; now that record is the problem named."""
    from types import SimpleNamespace

    from codemoat.audit import tpm_checkpoint

    fill(audit_log, 2)
    seq = audit_log.append("tpm_checkpoint", detail={"placeholder": 1})
    with audit_log.engine.begin() as c:
        c.exec_driver_sql("UPDATE audit_records SET detail = ? WHERE seq = ?", (detail, seq))
    problems, _ = tpm_checkpoint.check(audit_log.engine, SimpleNamespace(tpm={"identity": {"ak": "00"}}))
    assert len(problems) == 1 and problems[0][0] == seq and "does not hold" in problems[0][1], problems
