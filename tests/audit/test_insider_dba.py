"""A DBA of the shared PostgreSQL as an insider (multi-replica mode): without the machine key, editing
audit rows directly.

The unsigned tail (at most `audit.sign_every` records) is theirs to cut; a record a signed head names is
not. Before: the DBA deleted the newest signed record (their own request), wound `audit_tip` back one
record, and the chain's trigger linked the next record in its place; the next head was signed over the
rewritten chain and `audit verify` (and a verify from a fresh process) said OK, though every append had
signed its head (`sign_every = 1`, "no tail"). The signer now checks, before it signs on top of a head,
that the record that head names still has its hash.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from .logs import fill, open_log


def _wind_back(log, k: int, *, edit: bool) -> None:
    """The DBA: drop record `k` (or rewrite who made it) and put the tip back on record k - 1."""
    with log.engine.begin() as c:
        prev = c.execute(sa.text("select hash from audit_records where seq = :s"), {"s": k - 1}).scalar()
        if edit:  # rewrite the record in place and re-link it (SHA-256 needs no key)
            c.execute(sa.text("alter table audit_records disable trigger audit_chain"))
            row = c.execute(sa.text("select * from audit_records where seq = :s"), {"s": k}).mappings().one()
            from codemoat.audit.chain import body_hash, link_hash

            body = dict(row, user="alice")
            c.execute(
                sa.text("update audit_records set \"user\" = 'alice', hash = :h where seq = :s"),
                {"s": k, "h": link_hash(k, prev, body_hash(body))},
            )
            c.execute(sa.text("alter table audit_records enable trigger audit_chain"))
        else:
            c.execute(sa.text("delete from audit_records where seq = :s"), {"s": k})
            c.execute(sa.text("update audit_tip set seq = :s, hash = :h where id = 1"), {"s": k - 1, "h": prev})


@pytest.mark.parametrize("sign_every", [1, 4])
def test_a_dba_cannot_drop_a_signed_record_and_let_the_chain_relink_over_it(pg_url, audit_home, sign_every):
    from codemoat.audit.log import AuditUnavailable

    log = open_log(pg_url, audit_home, sign_every=sign_every)
    fill(log, 7)
    k = log.append("request", user="mallory", route="/v1/completions", status=200)
    log.sign()  # a head names mallory's record (with sign_every 1, the append itself signed it)
    assert log.verify().ok
    _wind_back(log, k, edit=False)
    with pytest.raises(AuditUnavailable, match=f"record {k} no longer matches the signed head"):
        fill(log, 6, 100)
        log.sign()
    rep = open_log(pg_url, audit_home, sign_every=sign_every).verify()  # a fresh process: no memory of its own
    assert not rep.ok and "rewritten" in rep.problem, rep.to_dict()  # the head still names mallory's record


def test_honest_appends_after_a_signed_head_still_sign(pg_url, audit_home):
    """The positive side: nothing rewritten, the check passes at every signing (one writer, then a second)."""
    log = open_log(pg_url, audit_home, sign_every=1)
    fill(log, 5)
    other = open_log(pg_url, audit_home, sign_every=3)
    fill(other, 7, 50)
    fill(log, 2, 80)
    other.sign()
    assert log.verify().ok and other.verify().ok


def test_a_dba_rewriting_a_signed_record_in_place_is_named_by_verify(pg_url, audit_home):
    """Rewritten and re-linked in place (the tip untouched): the writer signs on, and verify names it."""
    log = open_log(pg_url, audit_home, sign_every=1)
    fill(log, 4)
    k = log.append("request", user="mallory", route="/v1/completions", status=200)
    fill(log, 3, 10)
    _wind_back(log, k, edit=True)
    rep = open_log(pg_url, audit_home, sign_every=1).verify()
    assert not rep.ok and rep.first_bad == k, rep.to_dict()


def _put_back(log, saved) -> None:
    """The DBA: an earlier signed head row, copied before, written over the head."""
    with log.engine.begin() as c:
        cols = [x for x in saved if x != "id"]
        c.execute(sa.text(f"update audit_head set {', '.join(f'{x} = :{x}' for x in cols)} where id = 1"), dict(saved))


def test_a_dba_with_a_saved_head_row_cannot_relink_over_a_signed_record(pg_url, audit_home):
    """The relink, with a copy of the head row from before mallory's record put back: the database's
    head and chain agree, so only the writer that signed mallory's head can tell (it remembers that
    head, and its record is gone). Before, every append went on and a fresh verify said OK."""
    from codemoat.audit.log import AuditUnavailable

    log = open_log(pg_url, audit_home, sign_every=1)
    fill(log, 7)
    with log.engine.connect() as c:
        saved = c.execute(sa.text("select * from audit_head where id = 1")).mappings().one()
    k = log.append("request", user="mallory", route="/v1/completions", status=200)
    _wind_back(log, k, edit=False)
    _put_back(log, saved)
    with pytest.raises(AuditUnavailable, match=f"record {k} no longer matches the signed head"):
        fill(log, 3, 100)


def test_a_rotation_by_another_replica_is_not_taken_for_a_relink(pg_url, audit_home, tmp_path):
    """The positive side: another replica (or `codemoat audit rotate`) starts the chain again, so the
    record this writer's last head named is gone for a reason the chain's first record gives; it signs on."""
    from codemoat.audit.rotate import rotate

    log = open_log(pg_url, audit_home, sign_every=1)
    fill(log, 5)
    other = open_log(pg_url, audit_home, sign_every=1)
    rotate(other, tmp_path / "archive.jsonl")
    fill(other, 2, 20)
    fill(log, 4, 40)  # this writer's last head named record 5 of the old chain
    assert log.verify().ok


_DROP_MALLORY = r"""
CREATE OR REPLACE FUNCTION dba_hide() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW."user" = 'mallory' THEN
    RETURN NULL;
  END IF;
  RETURN NEW;
END
$$;
CREATE TRIGGER a_dba_hide BEFORE INSERT ON audit_records FOR EACH ROW EXECUTE FUNCTION dba_hide();
"""

_DELETE_MALLORY_AFTER = r"""
CREATE OR REPLACE FUNCTION dba_forget() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM audit_records WHERE seq = NEW.seq AND "user" = 'mallory';
  RETURN NULL;
END
$$;
CREATE TRIGGER z_dba_forget AFTER INSERT ON audit_records FOR EACH ROW EXECUTE FUNCTION dba_forget();
"""


def test_a_trigger_that_drops_a_users_records_refuses_their_requests_instead(pg_url, audit_home):
    """A DBA's own trigger (before the chain's: triggers fire by name) throws away mallory's records: the
    append is refused (the request is not served unaudited) and everyone else's records are kept."""
    log = open_log(pg_url, audit_home, sign_every=1)
    fill(log, 3)
    with log.engine.begin() as c:
        c.exec_driver_sql(_DROP_MALLORY)
    with pytest.raises(Exception, match="do not link to what was sent"):
        log.append("request", user="mallory", route="/v1/completions", status=200)
    fresh = open_log(pg_url, audit_home, sign_every=1)
    fill(fresh, 2, 10)  # another writer (a replica) keeps writing alice's
    rep = fresh.verify()
    assert rep.ok and rep.records == 5, rep.to_dict()


def test_a_trigger_that_deletes_a_record_after_it_is_linked_fails_verify(pg_url, audit_home):
    """An AFTER INSERT trigger deletes mallory's record once the chain linked it (the writer gets its number
    back). With `sign_every = 1` the signature after it finds the record gone: the append is refused (the
    request gets a 503, not served with its record gone; before, it was served and only the next signature
    stopped the writer), and once the chain goes on the log fails verify at the hole."""
    from codemoat.audit.log import AuditUnavailable

    log = open_log(pg_url, audit_home, sign_every=1)
    fill(log, 3)
    with log.engine.begin() as c:
        c.exec_driver_sql(_DELETE_MALLORY_AFTER)
    with pytest.raises(AuditUnavailable, match="record 4, just written, is no longer in the chain"):
        log.append("request", user="mallory", route="/v1/completions", status=200)
    assert not log.check_writable(max_age=0)  # the writer stopped
    fill(open_log(pg_url, audit_home, sign_every=1), 1, 10)  # another replica's record links to the hole
    rep = open_log(pg_url, audit_home, sign_every=1).verify()
    assert not rep.ok and rep.first_bad == 4, rep.to_dict()


_UNLINK_MALLORY_AFTER = r"""
CREATE OR REPLACE FUNCTION dba_unlink() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW."user" = 'mallory' THEN
    DELETE FROM audit_records WHERE seq = NEW.seq;
    UPDATE audit_tip SET seq = NEW.seq - 1, hash = NEW.prev_hash WHERE id = 1;
  END IF;
  RETURN NULL;
END
$$;
CREATE TRIGGER z_dba_unlink AFTER INSERT ON audit_records FOR EACH ROW EXECUTE FUNCTION dba_unlink();
"""


def test_a_trigger_that_deletes_a_record_and_winds_the_tip_back_gets_the_request_refused(pg_url, audit_home):
    """The same trigger, winding `audit_tip` back as well: the next record takes mallory's number and the chain
    has no hole. Before, with `sign_every = 1`, mallory's append returned (the request was served), nothing
    was left to sign, and the log verified with her record gone. Now the signature after the append looks for
    the record it just wrote: the append is refused, and what is served stays audited."""
    from codemoat.audit.log import AuditUnavailable

    log = open_log(pg_url, audit_home, sign_every=1)
    fill(log, 3)
    with log.engine.begin() as c:
        c.exec_driver_sql(_UNLINK_MALLORY_AFTER)
    with pytest.raises(AuditUnavailable, match="record 4, just written, is no longer in the chain"):
        log.append("request", user="mallory", route="/v1/completions", status=200)
    other = open_log(pg_url, audit_home, sign_every=1)
    assert fill(other, 2, 10) == [4, 5]  # the positive side: another replica's records, signed as they come
    with other.engine.connect() as c:
        users = [u for (u,) in c.execute(sa.text('select "user" from audit_records order by seq'))]
    assert users == ["alice"] * 5
    assert other.verify().ok
