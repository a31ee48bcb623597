"""The owed head's check (`cover`) is skipped on any chain that was ever rotated when
the writer has no last head of its own (`mine` None: it has not signed since it started and its home holds no head
file: a new replica, a container without a persistent home). heads.sign_tip: `_rotated_since(first, mine) if mine
is not None else first[1] > 0`: record 1 being a rotation record is taken for "rotated since", so the DBA who makes
the head unwritable, lets the new writer's first request be served (owed), deletes that record and winds the tip back
is not caught: the writer signs on over the cut. The same check guards the non-owed path (a trigger that deletes the
record after the chain linked it), so that one has the same hole on a rotated chain (pre-existing, session 17).
Found by reviewer V4 on f49a122; fixed by its patch (heads.sign_tip `first_seen`)."""

from __future__ import annotations

import contextlib

import sqlalchemy as sa

from codemoat.audit.log import AuditUnavailable
from codemoat.audit.rotate import rotate

from .logs import fill, open_log
from .test_audit_sign_after_commit import Heads


def test_an_owed_record_cut_on_a_rotated_chain_stops_a_writer_without_a_head_file(pg_url, audit_home, tmp_path):
    first = open_log(pg_url, audit_home, sign_every=1)
    fill(first, 3)
    rotate(first, tmp_path / "archive.jsonl")  # a routine rotation: record 1 is now a rotation record
    fill(first, 2)
    first.close()
    fresh = tmp_path / "fresh-home"  # a new replica: no head file of its own
    fresh.mkdir(mode=0o700)
    log = open_log(pg_url, fresh, sign_every=1)
    heads = Heads(pg_url)
    heads.refuse()
    seq = log.append("request", user="mallory", route="/v1/completions", status=200)  # served, its head owed
    with log.engine.begin() as c:
        prev = c.execute(sa.text("select hash from audit_records where seq = :s"), {"s": seq - 1}).scalar()
        c.execute(sa.text("delete from audit_records where seq = :s"), {"s": seq})
        c.execute(sa.text("update audit_tip set seq = :s, hash = :h where id = 1"), {"s": seq - 1, "h": prev})
    heads.allow()
    assert not log.check_writable(max_age=0), "signed on over the cut record"
    assert "tampered" in (log.failure or "")
    with contextlib.suppress(AuditUnavailable):  # close() signs what is unsigned: refused on a tampered log
        log.close()


def test_the_same_on_a_chain_never_rotated_is_caught(pg_url, audit_home, tmp_path):
    """The negative (f49a122's own case with a fresh writer): without a rotation the cut is found."""
    first = open_log(pg_url, audit_home, sign_every=1)
    fill(first, 3)
    first.close()
    fresh = tmp_path / "fresh-home"
    fresh.mkdir(mode=0o700)
    log = open_log(pg_url, fresh, sign_every=1)
    heads = Heads(pg_url)
    heads.refuse()
    seq = log.append("request", user="mallory", route="/v1/completions", status=200)
    with log.engine.begin() as c:
        prev = c.execute(sa.text("select hash from audit_records where seq = :s"), {"s": seq - 1}).scalar()
        c.execute(sa.text("delete from audit_records where seq = :s"), {"s": seq})
        c.execute(sa.text("update audit_tip set seq = :s, hash = :h where id = 1"), {"s": seq - 1, "h": prev})
    heads.allow()
    assert not log.check_writable(max_age=0)
    assert "tampered" in (log.failure or "")
    with contextlib.suppress(AuditUnavailable):  # close() signs what is unsigned: refused on a tampered log
        log.close()


def test_a_trigger_that_unlinks_a_record_on_a_rotated_chain_gets_the_request_refused(pg_url, audit_home, tmp_path):
    """The same hole without an owed head (session 17's cover check, sign_every = 1): test_insider_dba's trigger
    that deletes mallory's record after the chain linked it and winds the tip back, on a chain rotated once,
    against a writer with no head file: the append must be refused, as on a chain never rotated."""
    from .test_insider_dba import _UNLINK_MALLORY_AFTER

    first = open_log(pg_url, audit_home, sign_every=1)
    fill(first, 3)
    rotate(first, tmp_path / "archive.jsonl")
    fill(first, 2)
    first.close()
    fresh = tmp_path / "fresh-home"
    fresh.mkdir(mode=0o700)
    log = open_log(pg_url, fresh, sign_every=1)
    with log.engine.begin() as c:
        c.exec_driver_sql(_UNLINK_MALLORY_AFTER)
    try:
        log.append("request", user="mallory", route="/v1/completions", status=200)
    except AuditUnavailable as e:
        assert "no longer in the chain" in str(e)
    else:
        raise AssertionError("mallory's request was served and her record is gone")
    finally:
        with contextlib.suppress(AuditUnavailable):
            log.close()


def test_the_same_for_a_writer_whose_head_file_predates_a_rotation(pg_url, audit_home, tmp_path):
    """A writer restarted after another host rotated the chain reads back a head of the chain before (its head
    file): that head's record 1 is older, so the chain counts as "rotated since" for the first append's check
    too, and the trigger's cut goes through the same way."""
    from .test_insider_dba import _UNLINK_MALLORY_AFTER

    mine = open_log(pg_url, audit_home, sign_every=1)
    fill(mine, 3)  # its head file now holds its last head
    mine.close()
    other_home = tmp_path / "rotator"
    other_home.mkdir(mode=0o700)
    rotator = open_log(pg_url, other_home, sign_every=1)
    rotate(rotator, tmp_path / "archive.jsonl")  # another host's rotation: this home's head file is left as it was
    fill(rotator, 2)
    rotator.close()
    log = open_log(pg_url, audit_home, sign_every=1)  # restarted on its own home
    with log.engine.begin() as c:
        c.exec_driver_sql(_UNLINK_MALLORY_AFTER)
    try:
        log.append("request", user="mallory", route="/v1/completions", status=200)
    except AuditUnavailable as e:
        assert "no longer in the chain" in str(e)
    else:
        raise AssertionError("mallory's request was served and her record is gone")
    finally:
        with contextlib.suppress(AuditUnavailable):
            log.close()
