"""Rollback of the audit log: every state put back with its own valid signatures is refused.

The attacks need no key: empty the tables and delete the head file; drop the last record and put
back the older signed head (the head file keeps two slots); delete every checkpoint. A verifier
that remembers the last head it accepted (RFC 9162's signed tree heads) refuses them all, and a
head exported off the machine also catches a rewrite by whoever holds the key.
"""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest
from conftest import run_cli  # at import: later conftests (tests/vault) take the name `conftest`
from typer.testing import CliRunner

from codemoat.audit.log import AuditLog, head_file_for
from codemoat.cli.main import app
from codemoat.config import Settings

runner = CliRunner()


def fill(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.append(user=f"u{i % 3}", route="/v1/completions", protocol="openai", status=200, completion_tokens=i)


def sql(db_file, *statements: str) -> None:
    con = sqlite3.connect(db_file)
    for s in statements:
        con.execute(s)
    con.commit()
    con.close()


def verify(*extra: str):
    r = runner.invoke(app, ["audit", "verify", *extra])
    return r.exit_code, " ".join(r.output.split())  # rich wraps long lines


def copy_db(src, dst) -> None:
    """A consistent copy of a SQLite database in WAL mode (a plain file copy misses the WAL)."""
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    a.backup(b)
    a.close()
    b.close()


@pytest.fixture
def db_file(audit_home):
    return audit_home / "codemoat.db"


@pytest.fixture
def head_file(audit_home, db_url):
    return head_file_for(db_url, audit_home)


def slots(head_file) -> dict[int, bytes]:
    raw = head_file.read_bytes()
    return {json.loads(raw[i : i + 512])["seq"]: raw[i : i + 512] for i in (0, 512)}


def test_emptied_tables_and_deleted_head_file_refused(audit_log, db_file, head_file):
    fill(audit_log, 12)
    assert verify()[0] == 0
    sql(db_file, "DELETE FROM audit_records", "DELETE FROM audit_checkpoints", "DELETE FROM audit_head")
    head_file.unlink()
    code, out = verify()
    assert code == 1 and "FAILED at record 1" in out and "the log was emptied" in out and "saw 12 records" in out, out
    assert verify()[0] == 1  # and it stays refused


@pytest.mark.parametrize("head_file_left", ["deleted", "older slot twice"])
def test_last_record_dropped_and_older_head_restored_refused(audit_log, db_file, head_file, head_file_left, tmp_path):
    fill(audit_log, 6)
    assert verify()[0] == 0
    older = json.loads(slots(head_file)[5])
    sql(
        db_file,
        "DELETE FROM audit_records WHERE seq = 6",
        f"UPDATE audit_head SET seq={older['seq']}, hash='{older['hash']}', last_checkpoint={older['last_checkpoint']}, "
        f"ts_us={older['ts_us']}, signature='{older['signature']}' WHERE id = 1",
    )
    if head_file_left == "deleted":
        head_file.unlink()
    else:
        head_file.write_bytes(slots(head_file)[5] * 2)
    code, out = verify()
    assert (
        code == 1 and "FAILED at record 6" in out and "rolled back" in out and "saw record 6" in out and "ends at record 5" in out
    ), out
    # Deliberate (a restore from backup, say): the operator rotates, which says so in the new chain.
    r = runner.invoke(app, ["audit", "rotate", "--archive", str(tmp_path / "restored.jsonl")])
    assert r.exit_code == 0 and "NOT intact" in " ".join(r.output.split()), r.output
    assert verify()[0] == 0
    first = json.loads(runner.invoke(app, ["audit", "export"]).output.splitlines()[0])
    assert (
        first["kind"] == "rotation"
        and first["detail"]["previous_ok"] is False
        and "rolled back" in first["detail"]["previous_problem"]
    )


def test_every_checkpoint_deleted_refused(audit_log, db_file):
    fill(audit_log, 25)  # checkpoints at 10 and 20
    sql(db_file, "DELETE FROM audit_checkpoints")
    code, out = verify()  # even with no head remembered: the signed head names checkpoint 20
    assert code == 1 and "FAILED at record 20" in out and "every signed checkpoint was deleted" in out, out


def test_deleted_checkpoints_and_older_head_refused_by_memory(audit_log, db_file, head_file):
    """Checkpoints gone and a head from before the first checkpoint put back: only the memory knows."""
    fill(audit_log, 5)
    early = json.loads(slots(head_file)[5])  # last_checkpoint 0
    fill(audit_log, 7, start=5)
    assert verify()[0] == 0
    sql(
        db_file,
        "DELETE FROM audit_checkpoints",
        "DELETE FROM audit_records WHERE seq > 5",
        f"UPDATE audit_head SET seq=5, hash='{early['hash']}', last_checkpoint=0, ts_us={early['ts_us']}, "
        f"signature='{early['signature']}' WHERE id = 1",
    )
    head_file.unlink()
    code, out = verify()
    assert code == 1 and "rolled back" in out and "saw record 12" in out, out


def test_honest_log_that_grows_still_verifies(audit_log, tmp_path):
    assert verify()[0] == 0  # an empty, never-used log is fine
    fill(audit_log, 3)
    code, out = verify()
    assert code == 0 and "3 records" in out, out
    fill(audit_log, 9, start=3)
    audit_log.checkpoint("shutdown")
    code, out = verify()
    assert (
        code == 0
        and "12 records" in out
        and "consistent with the head `audit verify` last accepted" in out
        and "record 12" in out
    ), out
    # A rotation is the operator starting a new chain on purpose: the verifier follows it.
    r = runner.invoke(app, ["audit", "rotate", "--archive", str(tmp_path / "archive.jsonl")])
    assert r.exit_code == 0, r.output
    fill(audit_log, 2)
    code, out = verify()
    assert code == 0 and "3 records" in out, out


def test_remembered_head_file_tampered_refused(audit_log, audit_home):
    fill(audit_log, 4)
    assert verify()[0] == 0
    (memory,) = audit_home.glob("audit-verified-*.json")
    doc = json.loads(memory.read_text())
    memory.write_text(json.dumps(dict(doc, seq=3)))  # points at another record: its signature no longer holds
    code, out = verify()
    assert code == 1 and "invalid signature" in out, out
    memory.write_text("{not json")
    code, out = verify()
    assert code == 1 and "cannot be used" in out and "Traceback" not in out, out
    memory.write_text(json.dumps(doc))
    assert verify()[0] == 0


def test_exported_head_then_rollback_refused(audit_log, audit_home, db_file, head_file, tmp_path):
    """The attacker rolls everything on the machine back (database, head file, verifier's memory);
    only the head exported off the machine still knows, and it refuses."""
    fill(audit_log, 8)
    snap = tmp_path / "snap"
    snap.mkdir()
    copy_db(db_file, snap / "codemoat.db")
    shutil.copy2(head_file, snap / head_file.name)
    fill(audit_log, 4, start=8)
    exported = tmp_path / "off-machine-head.json"
    r = run_cli("audit", "head", "export", "-o", str(exported))
    assert r.returncode == 0 and "record 12" in r.stdout, r.stderr
    assert json.loads(exported.read_text())["seq"] == 12
    audit_log.engine.dispose()
    copy_db(snap / "codemoat.db", db_file)
    shutil.copy2(snap / head_file.name, head_file)
    for f in audit_home.glob("audit-verified-*"):
        f.unlink()
    r = run_cli("audit", "verify")
    assert r.returncode == 0  # what is left on the machine is consistent with itself: the stated limit
    r = run_cli("audit", "verify", "--trusted-head", str(exported))
    out = " ".join(r.stdout.split())
    assert r.returncode == 1 and "rolled back" in out and "saw record 12" in out and "ends at record 8" in out, (
        r.stdout + r.stderr
    )
    assert "Traceback" not in r.stderr


def test_exported_head_catches_a_key_holders_rewrite(audit_log, audit_home, db_file, head_file, tmp_path):
    """Same length, other records, every signature valid (made with the machine key): replaced."""
    fill(audit_log, 5)
    exported = tmp_path / "head.json"
    assert runner.invoke(app, ["audit", "head", "export", "-o", str(exported)]).exit_code == 0
    sql(
        db_file,
        "DELETE FROM audit_records",
        "DELETE FROM audit_checkpoints",
        "DELETE FROM audit_head",
        f"UPDATE audit_tip SET seq = 0, hash = '{'0' * 64}'",  # the chain starts again at record 1
    )
    head_file.unlink()
    for f in audit_home.glob("audit-verified-*"):
        f.unlink()
    fresh = AuditLog(audit_log.engine, head_file=head_file)
    fill(fresh, 5, start=100)
    assert verify()[0] == 0
    code, out = verify("--trusted-head", str(exported))
    assert code == 1 and "replaced or rewritten" in out and "record 5" in out, out


def test_exported_head_after_rotation_says_so(audit_log, tmp_path):
    fill(audit_log, 4)
    exported = tmp_path / "head.json"
    assert runner.invoke(app, ["audit", "head", "export", "-o", str(exported)]).exit_code == 0
    fill(audit_log, 3, start=4)
    assert runner.invoke(app, ["audit", "rotate", "--archive", str(tmp_path / "a.jsonl")]).exit_code == 0
    fill(audit_log, 5)
    code, out = verify("--trusted-head", str(exported))
    assert code == 1 and "rotated after" in out and "archives 7 records" in out, out


def test_head_export_and_trusted_head_errors_are_one_line(audit_log, db_file, tmp_path):
    r = run_cli("audit", "head", "export")
    assert r.returncode == 1 and "empty" in r.stderr + r.stdout and "Traceback" not in r.stderr
    fill(audit_log, 3)
    r = run_cli("audit", "head", "export")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["format"] == "codemoat-audit-head-v1" and doc["seq"] == 3 and doc["public_key"]
    r = run_cli("audit", "verify", "--trusted-head", str(tmp_path / "nope.json"))
    assert r.returncode == 1 and "no such file" in r.stderr + r.stdout and "Traceback" not in r.stderr
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    (tmp_path / "junk.bin").write_bytes(b"\x00junk")  # the operator named the wrong file: their mistake, not the log's
    for wrong, why in (("junk.bin", "is not JSON"), ("bad.json", "not a codemoat audit head"), (".", "is a folder")):
        r = run_cli("audit", "verify", "--trusted-head", str(tmp_path / wrong))
        assert r.returncode == 1 and why in r.stderr and "FAILED" not in r.stdout + r.stderr, (wrong, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    sql(db_file, "UPDATE audit_records SET user = 'mallory' WHERE seq = 2")
    r = run_cli("audit", "head", "export")
    assert r.returncode == 1 and "fails verification: record 2" in r.stderr and r.stdout == "" and "Traceback" not in r.stderr


def test_admin_api_verify_remembers_and_exports_the_head(engine, audit_home, db_file, head_file, random_gguf):
    """The real app: `/admin/api/audit/verify` refuses a rollback too; `/admin/api/audit/head` hands
    an admin the head to keep off the machine."""
    from fastapi.testclient import TestClient

    from codemoat.accounts import Accounts

    from .trustapp import make_app, make_tokens, tiny_engine

    llm = tiny_engine(random_gguf)
    accounts = Accounts(engine)
    tokens = make_tokens(accounts)
    try:
        with TestClient(make_app(Settings(), accounts, llm)) as c:
            assert c.get("/admin/api/audit/head", headers=tokens["root"]).status_code == 409  # nothing signed yet
            for _ in range(3):
                assert c.get("/v1/models", headers=tokens["alice"]).status_code == 200
            assert c.get("/admin/api/audit/head", headers=tokens["alice"]).status_code == 403
            r = c.get("/admin/api/audit/head", headers=tokens["root"])
            doc = r.json()
            assert r.status_code == 200 and doc["format"] == "codemoat-audit-head-v1" and doc["seq"] >= 3 and doc["public_key"]
            n = doc["seq"]
        sql(db_file, "DELETE FROM audit_records", "DELETE FROM audit_checkpoints", "DELETE FROM audit_head")
        head_file.unlink()
        with TestClient(make_app(Settings(), accounts, llm)) as c:
            r = c.get("/admin/api/audit/verify", headers=tokens["root"])
            problem = r.json()["problem"]
            assert r.status_code == 409 and ("emptied" in problem or "rolled back" in problem) and f"{n}" in problem, r.json()
    finally:
        llm.close()


def test_memory_that_cannot_be_written_is_a_warning_not_a_failure(audit_log, engine, tmp_path, head_file):
    fill(audit_log, 2)
    log = AuditLog(engine, head_file=head_file, verified_file=tmp_path / "no-such-dir" / "verified.json")
    rep = log.verify()
    assert rep.ok and rep.warning and "could not remember the verified head" in rep.warning


def test_head_export_keeps_an_earlier_head(audit_log, tmp_path):
    """An exported head is the anchor that catches a rollback: exporting again to its file (a cron job's
    fixed name, a typo) must not replace it with the head of a log rolled back meanwhile. Refused in one line
    and left as it was; --force replaces it; a link planted at the path is never written through."""
    fill(audit_log, 3)
    kept = tmp_path / "head.json"
    assert runner.invoke(app, ["audit", "head", "export", "-o", str(kept)]).exit_code == 0
    before = kept.read_bytes()
    fill(audit_log, 2, start=3)
    r = run_cli("audit", "head", "export", "-o", str(kept))
    assert r.returncode == 1 and "exists: pass --force" in r.stderr + r.stdout and "Traceback" not in r.stderr
    assert kept.read_bytes() == before and json.loads(before)["seq"] == 3
    r = run_cli("audit", "head", "export", "-o", str(kept), "--force")
    assert r.returncode == 0 and json.loads(kept.read_text())["seq"] == 5, r.stderr
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    link = tmp_path / "link.json"
    link.symlink_to(victim)
    r = run_cli("audit", "head", "export", "-o", str(link))
    assert r.returncode == 1 and "exists" in r.stderr + r.stdout
    r = run_cli("audit", "head", "export", "-o", str(link), "--force")  # the link is replaced, not followed
    assert r.returncode == 0 and victim.read_text() == "not yours" and not link.is_symlink()
    assert json.loads(link.read_text())["seq"] == 5
    r = run_cli("audit", "head", "export", "-o", str(tmp_path))
    assert r.returncode == 1 and "is a folder" in r.stderr + r.stdout and "Traceback" not in r.stderr
