"""`codemoat audit …` commands, driven through the real CLI app."""

from __future__ import annotations

import json
import sqlite3

from conftest import run_cli  # at import: later conftests (tests/vault) take the name `conftest`
from typer.testing import CliRunner

from codemoat.cli.main import app

runner = CliRunner()


def fill(audit_log, n=12):
    for i in range(n):
        audit_log.append(
            user="alice", token_id="tok_1", route="/v1/completions", protocol="openai", status=200, completion_tokens=i
        )


def test_verify_ok_then_fails_naming_the_record(audit_log, audit_home):
    fill(audit_log)
    r = runner.invoke(app, ["audit", "verify"])
    assert r.exit_code == 0 and "audit log OK" in r.output and "12 records" in r.output
    con = sqlite3.connect(audit_home / "codemoat.db")
    con.execute("UPDATE audit_records SET user = 'mallory' WHERE seq = 5")
    con.commit()
    r = runner.invoke(app, ["audit", "verify"])
    assert r.exit_code == 1 and "FAILED at record 5" in r.output
    r = runner.invoke(app, ["audit", "verify", "--json"])
    assert r.exit_code == 1 and json.loads(r.output)["first_bad"] == 5


def test_export(audit_log, tmp_path):
    fill(audit_log, 3)
    r = runner.invoke(app, ["audit", "export"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 0 and len(lines) == 3 and json.loads(lines[2])["completion_tokens"] == 2
    out = tmp_path / "a.csv"
    r = runner.invoke(app, ["audit", "export", "--format", "csv", "--since", "1h", "-o", str(out)])
    assert r.exit_code == 0 and len(out.read_text().splitlines()) == 4
    assert runner.invoke(app, ["audit", "export", "--since", "2999-01-01"]).output == ""
    r = runner.invoke(app, ["audit", "export", "--format", "xml"])
    assert r.exit_code != 0


def test_export_to_a_file_keeps_an_earlier_export_unless_forced(audit_log, tmp_path):
    """As every other --output: an export does not overwrite a file unasked (the day-before's export, or a file
    someone linked there); with --force the old file stays whole until the new one replaces it."""
    fill(audit_log, 3)
    out = tmp_path / "day1.jsonl"
    assert runner.invoke(app, ["audit", "export", "-o", str(out)]).exit_code == 0
    before = out.read_bytes()
    assert len(before.splitlines()) == 3
    fill(audit_log, 2)
    r = run_cli("audit", "export", "-o", str(out))
    assert r.returncode == 1 and r.stderr.strip().endswith(
        f"{out} exists: pass --force to replace it (an earlier export: name a new file, e.g. one a day)"
    )
    assert "Traceback" not in r.stderr and out.read_bytes() == before
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "link.jsonl").symlink_to(victim)
    assert run_cli("audit", "export", "-o", str(tmp_path / "link.jsonl")).returncode == 1
    assert victim.read_text() == "keep me"  # not written through
    r = run_cli("audit", "export", "-o", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 5 and not list(tmp_path.glob(".*.tmp"))
    r = run_cli("audit", "export", "-o", str(tmp_path / "link.jsonl"), "--force")
    assert r.returncode == 0 and victim.read_text() == "keep me"  # the link is replaced, not followed
    assert not (tmp_path / "link.jsonl").is_symlink()


def test_outbound_shows_payloads_verbatim(audit_home):
    assert "nothing has been sent" in runner.invoke(app, ["audit", "outbound"]).output
    body = '{"license":"lic_1","machine":"m_2","nonce":"n3"}'
    line = {
        "id": "r1",
        "time": "2026-11-28T10:00:00Z",
        "destination": "https://keys.vendor.example/v1/lease",
        "method": "POST",
        "body": body,
        "status": None,
    }
    (audit_home / "outbound.jsonl").write_text(json.dumps(line) + "\n" + json.dumps(dict(line, body=None, status=200)) + "\n")
    r = runner.invoke(app, ["audit", "outbound"])
    assert (
        r.exit_code == 0 and body in r.output and "https://keys.vendor.example/v1/lease" in r.output and "status 200" in r.output
    )
    assert json.loads(runner.invoke(app, ["audit", "outbound", "--json"]).output)[0]["body"] == body


def test_alerts(audit_log):
    assert "no alerts" in runner.invoke(app, ["audit", "alerts"]).output
    audit_log.append("alert", user="mallory", detail={"reasons": ["volume", "novelty"], "signals": {"requests": 1500}})
    r = runner.invoke(app, ["audit", "alerts"])
    assert r.exit_code == 0 and "mallory" in r.output and "volume, novelty" in r.output
    assert json.loads(runner.invoke(app, ["audit", "alerts", "--json"]).output)[0]["user"] == "mallory"


def test_rotate_archives_and_restarts_a_tampered_log(audit_log, audit_home, tmp_path):
    import hashlib

    from codemoat.audit.log import AuditUnavailable

    fill(audit_log, 5)
    con = sqlite3.connect(audit_home / "codemoat.db")
    con.execute("DELETE FROM audit_head")  # tampering: the log refuses to grow
    con.commit()
    try:
        fill(audit_log, 1)
        raise AssertionError("appended to a tampered log")
    except AuditUnavailable:
        pass
    arc = tmp_path / "audit-2026-11.jsonl"
    r = runner.invoke(app, ["audit", "rotate", "--archive", str(arc), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["records"] == 5 and d["previous_ok"] is False and "head is missing" in d["previous_problem"]
    assert hashlib.sha256(arc.read_bytes()).hexdigest() == d["archive_sha256"] and arc.stat().st_mode & 0o777 == 0o600
    lines = [json.loads(x) for x in arc.read_text().splitlines()]
    assert [x["entry"] for x in lines].count("record") == 5 and lines[0]["verify"]["ok"] is False
    assert json.loads(runner.invoke(app, ["audit", "verify", "--json"]).output)["ok"]  # just the rotation record
    fill(audit_log, 2)  # the new chain takes records again
    r = runner.invoke(app, ["audit", "verify", "--json"])
    rep = json.loads(r.output)
    assert r.exit_code == 0 and rep["records"] == 3
    first = json.loads(runner.invoke(app, ["audit", "export"]).output.splitlines()[0])
    assert first["kind"] == "rotation" and first["detail"]["archive_sha256"] == d["archive_sha256"]
    assert runner.invoke(app, ["audit", "rotate", "--archive", str(arc)]).exit_code != 0  # never overwrites an archive


def test_outbound_shows_a_line_that_is_not_utf8_and_keeps_going(audit_home):
    good = {
        "id": "r1",
        "time": "2026-11-28T10:00:00Z",
        "destination": "https://keys.vendor.example/v1/lease",
        "method": "POST",
        "body": "a\u2028b",
        "status": None,
    }
    (audit_home / "outbound.jsonl").write_bytes(
        json.dumps(good, ensure_ascii=False).encode()
        + b"\n"
        + b'{"id": "r2", "body": "caf\xe9 \xff"}\n'  # latin-1 bytes: not UTF-8
        + json.dumps(dict(good, id="r3", status=200)).encode()
        + b"\n"
        + b"3\n"  # JSON, but not an object
    )
    r = runner.invoke(app, ["audit", "outbound"])
    assert r.exit_code == 0, r.output
    assert "line 2 (not valid UTF-8" in r.output and "status 200" in r.output and "line 4 (not a JSON object): 3" in r.output
    r = runner.invoke(app, ["audit", "outbound", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [x.get("id") for x in rows] == ["r1", None, "r3", None]
    assert rows[0]["body"] == "a\u2028b"  # one line, though str.splitlines would cut it
    assert rows[1] == {"line": 2, "raw": '{"id": "r2", "body": "caf\ufffd \ufffd"}', "not_utf8": True}
    assert rows[3] == {"line": 4, "raw": "3"}


def test_export_since_out_of_range_is_one_line(audit_log):
    fill(audit_log, 2)
    r = run_cli("audit", "export", "--since", "99999999999999d")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == "error: cannot use --since '99999999999999d': duration '99999999999999d' is too long"
    for ok in ("2w", "2900000d"):  # about 7,900 years back: still allowed, and reads every record
        r = run_cli("audit", "export", "--since", ok)
        assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr


def test_outbound_cannot_drive_the_terminal(audit_home):
    """A terminal escape sequence written into the file is shown as text, never sent to the terminal."""
    (audit_home / "outbound.jsonl").write_bytes(
        json.dumps(
            {
                "id": "r1",
                "time": "t",
                "destination": "http://127.0.0.1/x\x1b]0;owned\x07",
                "method": "POST",
                "body": "\x1b[2J\x1b[31mred",
                "status": 200,
            }
        ).encode()
        + b"\n"
        + b"raw \x1b[2J line\n"
    )
    r = runner.invoke(app, ["audit", "outbound"])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output
    assert "\\x1b[2J\\x1b[31mred" in r.output and "raw \\x1b[2J line" in r.output and "\\x1b]0;owned\\x07" in r.output
