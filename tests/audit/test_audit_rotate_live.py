"""`codemoat audit rotate` run while a replica serves (another process, the same PostgreSQL). The
rotation archives and deletes the chain, the head and the checkpoints; a replica's appends and
signatures meanwhile wait on the rows it holds (the tip, the head) and go on when it commits. That is
not tampering: the replica must sign on. Before, the rotation record and its head came in later
transactions of their own, so a replica's waiting append took record 1 of the new chain (its next
signature then called the rotation a relink: its last head's record was gone and the chain did not
start with a rotation), and a replica's waiting signature found the head deleted (a 'missing' head,
tampering). Both stopped the replica's writer, and every request it served after got a 503.
"""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa

from .logs import fill, open_log


def _waiting_on_locks(eng) -> int:
    """How many other sessions of this database wait on a lock now."""
    with eng.connect() as c:
        return c.execute(
            sa.text(
                "select count(*) from pg_stat_activity where datname = current_database() "
                "and wait_event_type = 'Lock' and pid <> pg_backend_pid()"
            )
        ).scalar()


def _until(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_replica_appending_during_a_rotation_signs_on(pg_url, audit_home, tmp_path):
    """The replica's request waited on the tip while the rotation archived: it comes after the rotation
    record, which is record 1 of the new chain, and the replica's next signature (its last head named
    record 5 of the old chain) signs on."""
    from codemoat.audit.rotate import rotate
    from codemoat.db import open_db

    replica = open_log(pg_url, audit_home, sign_every=64)
    fill(replica, 5)
    replica.sign()  # this replica signed the old chain's head (record 5)
    rotator = open_log(pg_url, audit_home, sign_every=64)  # `codemoat audit rotate`, another process

    hold = open_db(pg_url)
    c = hold.connect()
    tx = c.begin()
    c.execute(sa.text("select seq from audit_tip where id = 1 for update"))  # the tip busy (an append in flight)
    done: dict[str, object] = {}

    def run(name, fn):
        try:
            done[name] = fn()
        except Exception as e:  # reported by the asserts below
            done[name] = e

    r = threading.Thread(daemon=True, target=run, args=("rotate", lambda: rotate(rotator, tmp_path / "archive.jsonl")))
    try:
        r.start()
        _until(lambda: _waiting_on_locks(hold) >= 1, "the rotation to wait on the tip")
        a = threading.Thread(
            daemon=True,
            target=run,
            args=("append", lambda: replica.append("request", user="bob", route="/v1/completions", status=200)),
        )
        a.start()
        _until(lambda: _waiting_on_locks(hold) >= 2, "the replica's append to wait on the tip")
    finally:  # the tip let go: the rotation, then the append, go on
        tx.rollback()
        c.close()
        hold.dispose()
    r.join(60)
    a.join(60)
    assert not r.is_alive() and not a.is_alive()
    assert isinstance(done["rotate"], dict), done
    assert done["append"] == 2, done  # after the rotation record
    with replica.engine.connect() as cx:
        kinds = [k for (k,) in cx.execute(sa.text("select kind from audit_records order by seq"))]
    assert kinds == ["rotation", "request"], kinds

    replica.sign()  # the replica signs on over the new chain
    fill(replica, 3, 10)
    replica.sign()
    assert replica.verify().ok, replica.verify().to_dict()


def test_a_replica_signing_during_a_rotation_signs_on(pg_url, audit_home, tmp_path):
    """The replica's signature waited on the head row, which the rotation deleted and wrote anew: it
    signs on the new chain's head, not 'the signed head is missing'."""
    from codemoat.audit.rotate import rotate
    from codemoat.db import open_db

    replica = open_log(pg_url, audit_home, sign_every=1)
    fill(replica, 5)  # each append signed: this replica has seen a signed head
    rotator = open_log(pg_url, audit_home, sign_every=64)

    hold = open_db(pg_url)
    c = hold.connect()
    tx = c.begin()
    c.execute(sa.text("select seq from audit_head where id = 1 for update"))  # a signature in flight
    done: dict[str, object] = {}

    def run(name, fn):
        try:
            done[name] = fn()
        except Exception as e:
            done[name] = e

    r = threading.Thread(daemon=True, target=run, args=("rotate", lambda: rotate(rotator, tmp_path / "archive.jsonl")))
    try:
        r.start()
        _until(lambda: _waiting_on_locks(hold) >= 1, "the rotation to wait on the head row")
        s = threading.Thread(daemon=True, target=run, args=("sign", replica.sign))
        s.start()
        _until(lambda: _waiting_on_locks(hold) >= 2, "the replica's signature to wait on the head row")
    finally:
        tx.rollback()
        c.close()
        hold.dispose()
    r.join(60)
    s.join(60)
    assert not r.is_alive() and not s.is_alive()
    assert isinstance(done["rotate"], dict), done
    assert not isinstance(done["sign"], Exception), done
    fill(replica, 3, 10)  # and appends, each signed, go on
    assert replica.verify().ok, replica.verify().to_dict()


def test_an_append_committed_while_a_rotation_archives_goes_into_the_new_chain(pg_url, audit_home, tmp_path):
    """The rotation had read and deleted the records and waited on the head row (a signature in flight) when a
    replica's append came. Before, the rotation took the tip only after that, so the append committed at
    once, numbered after the old chain (record 6): left behind the new chain, in no archive, and the log
    failed verify ('records 2-5 are missing'). Now the rotation takes the tip first: the append waits for
    it and becomes record 2 of the new chain."""
    from codemoat.audit.rotate import rotate
    from codemoat.db import open_db

    replica = open_log(pg_url, audit_home, sign_every=64)
    fill(replica, 5)
    replica.sign()
    rotator = open_log(pg_url, audit_home, sign_every=64)

    hold = open_db(pg_url)
    c = hold.connect()
    tx = c.begin()
    c.execute(sa.text("select seq from audit_head where id = 1 for update"))  # a signature in flight
    done: dict[str, object] = {}

    def run(name, fn):
        try:
            done[name] = fn()
        except Exception as e:  # reported by the asserts below
            done[name] = e

    r = threading.Thread(daemon=True, target=run, args=("rotate", lambda: rotate(rotator, tmp_path / "archive.jsonl")))
    a = threading.Thread(
        daemon=True,
        target=run,
        args=("append", lambda: replica.append("request", user="bob", route="/v1/completions", status=200)),
    )
    try:
        r.start()
        _until(lambda: _waiting_on_locks(hold) >= 1, "the rotation to wait on the head row")
        a.start()
        _until(lambda: "append" in done or _waiting_on_locks(hold) >= 2, "the append to end or wait")
    finally:
        tx.rollback()
        c.close()
        hold.dispose()
    r.join(60)
    a.join(60)
    assert not r.is_alive() and not a.is_alive()
    assert isinstance(done["rotate"], dict) and done["rotate"]["records"] == 5, done
    assert done["append"] == 2, done
    with replica.engine.connect() as cx:
        kinds = [k for (k,) in cx.execute(sa.text("select kind from audit_records order by seq"))]
    assert kinds == ["rotation", "request"], kinds
    replica.sign()
    rep = replica.verify()
    assert rep.ok, rep.to_dict()


def test_on_sqlite_a_second_process_signs_on_after_a_rotation(db_url, audit_home, tmp_path):
    """SQLite, two processes on one file (serve and `codemoat audit rotate`): the rotation's record and
    head come in its own transaction, so the serving log's next append follows them and signs on."""
    from codemoat.audit.rotate import rotate

    serving = open_log(db_url, audit_home)
    fill(serving, 5)
    rotator = open_log(db_url, audit_home)
    rotate(rotator, tmp_path / "archive.jsonl")
    assert fill(serving, 3, 10) == [2, 3, 4]
    with serving.engine.connect() as c:
        assert c.execute(sa.text("select kind from audit_records where seq = 1")).scalar() == "rotation"
    assert serving.verify().ok and rotator.verify().ok
