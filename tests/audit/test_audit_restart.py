"""A writer restarted between a DBA's relink and its next signature remembers the last head it signed.

A writer refuses to sign on top of a chain that no longer holds the record of the last head it signed
(`test_insider_dba`: a DBA deleted signed records, wound `audit_tip` back, let the chain relink and put an
earlier signed head row back). It remembered that head in memory only, so a writer restarted in between
signed over the relinked chain. Now it reads the head back from its head file (in its home, outside the
database; record 1's hash and rotation number are kept beside the head) and refuses its first signature;
so too for an older rotated chain put back, or the head row deleted, while it was down. An honest restart never stops it: a rotation while it was down (on this host or another), another
replica's heads since, a head file written before record 1 was kept in it, a new database at the same URL
with the old one's head file, and a head file that is missing, damaged or not a file.

Each restart is real: the first log is closed and its engine disposed, and a new `AuditLog` opens the
same database and home. SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import sqlalchemy as sa

from .logs import fill, open_log
from .test_audit_rotate_clock import _copy_chain, _put_chain

BACKENDS = ["db_url", "pg_url"]  # SQLite, and the session's real PostgreSQL


def _stop(log) -> None:
    """The writer's process ends: what it left unsigned is signed, its head file and connections closed."""
    log.close()
    log.engine.dispose()


def _drop(log) -> None:
    """A writer that stopped (tampered): its process ends, what it left unsigned stays unsigned."""
    from codemoat.audit.log import AuditUnavailable

    try:
        log.close()
    except AuditUnavailable:
        pass  # its final signature is refused as the others were; close() still closed its files
    log.engine.dispose()


def _head_row(log) -> dict:
    with log.engine.connect() as c:
        return dict(c.execute(sa.text("select * from audit_head where id = 1")).mappings().one())


def _relink(eng, k: int, saved: dict) -> None:
    """The DBA: delete record `k` (and any after it), put the tip back on record k - 1 and the saved head row
    back, so that the next record appended takes number k and the database's head and chain agree."""
    with eng.begin() as c:
        prev = c.execute(sa.text("select hash from audit_records where seq = :s"), {"s": k - 1}).scalar()
        c.execute(sa.text("delete from audit_checkpoints where seq >= :s"), {"s": k})
        c.execute(sa.text("delete from audit_records where seq >= :s"), {"s": k})
        c.execute(sa.text("update audit_tip set seq = :s, hash = :h where id = 1"), {"s": k - 1, "h": prev})
        cols = [x for x in saved if x != "id"]
        c.execute(sa.text(f"update audit_head set {', '.join(f'{x} = :{x}' for x in cols)} where id = 1"), saved)


def _mallory_relinked_while_down(url, home, sign_every: int = 1) -> int:
    """Mallory's record is signed, the writer stops, the DBA relinks over it: mallory's seq."""
    log = open_log(url, home, sign_every=sign_every)
    fill(log, 7)
    log.sign()
    saved = _head_row(log)  # a copy of the head row from before mallory's record
    k = log.append("request", user="mallory", route="/v1/completions", status=200)
    log.sign()  # a head names mallory's record (with sign_every 1 the append itself signed it)
    _stop(log)
    dba = _engine(url)
    _relink(dba, k, saved)
    dba.dispose()
    return k


@pytest.mark.parametrize("sign_every", [1, 4])
@pytest.mark.parametrize("db", BACKENDS)
def test_a_relink_while_the_writer_was_down_is_refused_at_its_first_signature(db, request, audit_home, sign_every):
    """Before, the restarted writer had no memory and signed over the relinked chain (failed before)."""
    from codemoat.audit.log import AuditUnavailable

    url = request.getfixturevalue(db)
    k = _mallory_relinked_while_down(url, audit_home, sign_every)
    restarted = open_log(url, audit_home, sign_every=sign_every)
    with pytest.raises(AuditUnavailable, match=f"record {k} no longer matches the signed head"):
        fill(restarted, 3, 100)
        restarted.sign()
    with pytest.raises(AuditUnavailable, match="tampered"):  # and it stays stopped: every request refused
        fill(restarted, 4, 200)
    _drop(restarted)


@pytest.mark.parametrize("db", BACKENDS)
def test_an_honest_restart_signs_on_and_keeps_record_1_in_the_head_file(db, request, audit_home):
    url = request.getfixturevalue(db)
    log = open_log(url, audit_home, sign_every=1)
    fill(log, 5)
    _stop(log)
    slots = _slots(log.head_file)
    eng = _engine(url)
    with eng.connect() as c:
        one = c.execute(sa.text("select hash from audit_records where seq = 1")).scalar()
    eng.dispose()
    assert {s["seq"] for s in slots} == {5} or {s["seq"] for s in slots} == {4, 5}
    assert all(s["first"] == one and s["rotation"] == 0 for s in slots), slots
    restarted = open_log(url, audit_home, sign_every=1)
    assert fill(restarted, 3, 10) == [6, 7, 8]
    rep = restarted.verify()
    assert rep.ok, rep.to_dict()
    _stop(restarted)


def _engine(url):
    from codemoat.db import make_engine

    return make_engine(url)


def _slots(path) -> list[dict]:
    raw = path.read_bytes()
    return [json.loads(raw[i : i + 512]) for i in range(0, len(raw), 512) if raw[i : i + 512].strip()]


@pytest.mark.parametrize("where", ["this host", "another host"])
@pytest.mark.parametrize("db", BACKENDS)
def test_a_rotation_while_the_writer_was_down_is_not_taken_for_a_relink(db, request, audit_home, tmp_path, where):
    """`codemoat audit rotate` on this host (it rewrites this home's head file) or on another (this home's
    head file still names the old chain's record 5): the restarted writer signs on."""
    from codemoat.audit.rotate import rotate

    url = request.getfixturevalue(db)
    log = open_log(url, audit_home, sign_every=1)
    fill(log, 5)
    _stop(log)
    other_home = tmp_path / "other-host"
    other_home.mkdir(mode=0o700)
    rotator = open_log(url, audit_home if where == "this host" else other_home, sign_every=1)
    rotate(rotator, tmp_path / "archive.jsonl")
    fill(rotator, 2, 20)
    _stop(rotator)
    restarted = open_log(url, audit_home, sign_every=1)
    assert fill(restarted, 3, 40) == [4, 5, 6]
    rep = restarted.verify()
    assert rep.ok, rep.to_dict()
    _stop(restarted)


@pytest.mark.parametrize("db", BACKENDS)
def test_an_older_rotated_chain_put_back_while_the_writer_was_down_stops_it(db, request, audit_home, tmp_path):
    """The negative side of the rotation: the DBA kept the first rotation's chain and a signed head of it and
    puts them back after a second rotation, while the writer is down (its head file names record 3 of the
    second rotation's chain). Record 1 is a rotation record, but not a later one: the writer stops."""
    from codemoat.audit.log import AuditUnavailable
    from codemoat.audit.rotate import rotate

    url = request.getfixturevalue(db)
    log = open_log(url, audit_home, sign_every=1)
    fill(log, 2)
    rotate(log, tmp_path / "one.jsonl")
    fill(log, 4, 10)
    kept = _copy_chain(log.engine)
    rotate(log, tmp_path / "two.jsonl")
    fill(log, 2, 20)
    _stop(log)
    eng = _engine(url)
    _put_chain(eng, kept["records"], cps=kept["checkpoints"], head_row=kept["head"])
    eng.dispose()
    restarted = open_log(url, audit_home, sign_every=1)
    with pytest.raises(AuditUnavailable, match="record 3 no longer matches the signed head"):
        fill(restarted, 1, 30)
    _drop(restarted)


@pytest.mark.parametrize("db", BACKENDS)
def test_another_replicas_heads_since_do_not_stop_the_restarted_writer(db, request, audit_home, tmp_path):
    url = request.getfixturevalue(db)
    log = open_log(url, audit_home, sign_every=1)
    fill(log, 5)
    _stop(log)
    other_home = tmp_path / "replica-2"
    other_home.mkdir(mode=0o700)
    replica = open_log(url, other_home, sign_every=3)
    fill(replica, 7, 50)  # heads at 8 and 11 signed by the other replica, 12 unsigned
    restarted = open_log(url, audit_home, sign_every=1)
    assert fill(restarted, 2, 80) == [13, 14]
    fill(replica, 3, 90)
    replica.sign()
    assert restarted.verify().ok
    _stop(replica)
    _stop(restarted)


@pytest.mark.parametrize("db", BACKENDS)
def test_a_head_file_from_before_record_1_was_kept_is_read_as_record_1_unknown(db, request, audit_home):
    """A head file written before this change (no `first`, no `rotation`): an honest restart signs on, and
    the next head written carries record 1 again. Record 1 unknown, a head no longer in the chain cannot be
    told from another database's (below), so the relink then goes on with a warning: the limit of a head
    file that old, for the one restart after the upgrade."""
    url = request.getfixturevalue(db)
    log = open_log(url, audit_home, sign_every=1)
    fill(log, 5)
    _stop(log)
    _strip_record_1(log.head_file)
    restarted = open_log(url, audit_home, sign_every=1)
    assert fill(restarted, 2, 10) == [6, 7]
    assert any(s.get("first") for s in _slots(log.head_file))
    _stop(restarted)
    assert restarted.verify().ok


def _strip_record_1(path) -> None:
    raw = path.read_bytes()
    out = b""
    for i in range(0, len(raw), 512):
        d = json.loads(raw[i : i + 512])
        d.pop("first"), d.pop("rotation")
        out += json.dumps(d, separators=(",", ":")).encode().ljust(511) + b"\n"
    path.write_bytes(out)


def _recreate(url) -> None:
    """The operator drops the database and creates it anew at the same URL (migrated, empty)."""
    from codemoat.db import CUSTOMER_BRANCHES, make_engine, upgrade

    u = sa.engine.make_url(url)
    if u.get_backend_name() == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(u.database + suffix)
            except FileNotFoundError:
                pass
    else:
        admin = make_engine(u.set(database="postgres").render_as_string(hide_password=False))
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(sa.text(f'DROP DATABASE "{u.database}" WITH (FORCE)'))
            c.execute(sa.text(f'CREATE DATABASE "{u.database}"'))
        admin.dispose()
    eng = make_engine(url)
    upgrade(eng, CUSTOMER_BRANCHES)
    eng.dispose()


@pytest.mark.parametrize("db", BACKENDS)
def test_a_new_database_at_the_same_url_with_the_old_head_file_signs_on(db, request, audit_home, caplog):
    """The old database's head file names its record 5; the new database's chain begins with another
    record 1 and was never rotated: a warning, and the restarted writer signs on."""
    url = request.getfixturevalue(db)
    log = open_log(url, audit_home, sign_every=1)
    fill(log, 5)
    _stop(log)
    _recreate(url)
    restarted = open_log(url, audit_home, sign_every=1)
    with caplog.at_level(logging.WARNING, logger="codemoat.audit"):
        assert fill(restarted, 7, 10) == list(range(1, 8))
    assert "taken for a new database at this URL" in caplog.text
    _stop(restarted)
    assert restarted.verify().ok  # the head file now holds the new chain's heads


@pytest.mark.parametrize("what", ["missing", "garbage", "one slot damaged", "a folder", "a FIFO"])
@pytest.mark.parametrize("db", BACKENDS)
def test_a_head_file_missing_or_unreadable_is_a_warning_and_the_writer_signs_on(db, request, audit_home, caplog, what):
    url = request.getfixturevalue(db)
    log = open_log(url, audit_home, sign_every=1)
    fill(log, 5)
    _stop(log)
    hf = log.head_file
    if what == "garbage":
        hf.write_bytes(os.urandom(1024))
    elif what == "one slot damaged":
        raw = hf.read_bytes()
        hf.write_bytes(b"{not json".ljust(512) + raw[512:])
    else:
        hf.unlink()
        if what == "a folder":
            hf.mkdir()
        elif what == "a FIFO":
            os.mkfifo(hf, 0o600)
    restarted = open_log(url, audit_home, sign_every=1)
    with caplog.at_level(logging.WARNING, logger="codemoat.audit"):
        assert fill(restarted, 2, 10) == [6, 7]
    warned = [r.getMessage() for r in caplog.records if "read back" in r.getMessage() or "is damaged" in r.getMessage()]
    if what == "missing":
        assert not warned, caplog.text
    else:
        assert len(warned) == 1 and "\n" not in warned[0] and "Traceback" not in caplog.text, caplog.text
    _drop(restarted)


@pytest.mark.parametrize("db", BACKENDS)
def test_a_relink_while_down_is_refused_with_one_slot_of_the_head_file_damaged(db, request, audit_home):
    """The negative side of a damaged slot: the other one still holds the writer's last head."""
    from codemoat.audit.log import AuditUnavailable

    url = request.getfixturevalue(db)
    k = _mallory_relinked_while_down(url, audit_home)
    from codemoat.audit.log import head_file_for

    hf = head_file_for(url, audit_home)
    raw = hf.read_bytes()
    keep = [raw[i : i + 512] for i in (0, 512) if json.loads(raw[i : i + 512])["seq"] == k][0]
    hf.write_bytes(b"\x00garbage".ljust(512) + keep)
    restarted = open_log(url, audit_home, sign_every=1)
    with pytest.raises(AuditUnavailable, match=f"record {k} no longer matches the signed head"):
        fill(restarted, 1, 100)
    _drop(restarted)


@pytest.mark.parametrize("db", BACKENDS)
def test_a_head_row_deleted_while_the_writer_was_down_stops_it(db, request, audit_home):
    """A short log (no checkpoint yet, far less than the unsigned tail allowed): the DBA deletes the signed
    head row while the writer is down. One that stayed up knew it had seen a head; the restarted one knows
    it from its head file, whose head was signed over this chain (record 1 is the same). Failed before."""
    from codemoat.audit.log import AuditUnavailable

    url = request.getfixturevalue(db)
    log = open_log(url, audit_home, sign_every=1)
    fill(log, 6)
    _stop(log)
    eng = _engine(url)
    with eng.begin() as c:
        c.execute(sa.text("delete from audit_head"))
    eng.dispose()
    restarted = open_log(url, audit_home, sign_every=1)
    with pytest.raises(AuditUnavailable, match="the signed head is missing"):
        fill(restarted, 1, 10)
    _drop(restarted)
