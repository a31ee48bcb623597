"""Signatures batched per `sign_every` records / `sign_interval_ms` (`audit.heads`), on SQLite and PostgreSQL:
every record is linked at once, the unsigned tail after the signed head is bounded in count and
time and reported by `audit verify`; the attacker's edits, cuts, reorders and forged checkpoints."""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa

from .logs import fill, open_log

GENESIS = "0" * 64


def _log(url, home, **kw):
    return open_log(url, home, **{"sign_every": 8, **kw})


def _head(log):
    with log.engine.connect() as c:
        return c.execute(sa.text("select seq, last_checkpoint from audit_head")).first()


def _sql(log, *stmts, **params):
    with log.engine.begin() as c:
        for s in stmts:
            c.execute(sa.text(s), params)


def _relink(log, start):
    """What someone who can write the database but has no key does after changing records: re-link from `start`."""
    from codemoat.audit.chain import body_hash, link_hash

    with log.engine.begin() as c:
        if log.engine.dialect.name == "postgresql":
            c.execute(sa.text("alter table audit_records disable trigger audit_chain"))
        rows = [r._asdict() for r in c.execute(sa.text("select * from audit_records where seq >= :s order by seq"), {"s": start})]
        prev = c.execute(sa.text("select hash from audit_records where seq = :s"), {"s": start - 1}).scalar() or GENESIS
        for r in rows:
            h = link_hash(r["seq"], prev, body_hash(r))
            c.execute(
                sa.text("update audit_records set prev_hash = :p, hash = :h where seq = :s"), {"p": prev, "h": h, "s": r["seq"]}
            )
            prev = h
        c.execute(sa.text("update audit_tip set seq = :s, hash = :h"), {"s": rows[-1]["seq"] if rows else start - 1, "h": prev})


def test_the_tail_is_bounded_by_count_reported_and_signed_at_close(database_url, audit_home):
    log = _log(database_url, audit_home)
    fill(log, 21)
    assert tuple(_head(log)) == (16, 10)  # signed at 8 and 16 (checkpoint at 10); 17–21 wait
    rep = log.verify()
    assert rep.ok and rep.unsigned == 5 and rep.unsigned_since, rep.problem
    assert "records 17–21 (5," in rep.warning and "cut or rewrite" in rep.warning
    log.close()
    assert tuple(_head(log)) == (21, 20)
    rep = log.verify()
    assert rep.ok and rep.unsigned == 0 and rep.warning is None


def test_the_tail_is_bounded_in_time(database_url, audit_home):
    log = _log(database_url, audit_home, sign_every=1000, sign_interval_ms=150)
    fill(log, 3)
    deadline = time.monotonic() + 20
    while (_head(log) is None or _head(log)[0] < 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _head(log)[0] == 3  # nobody appended again: the timer signed
    assert log.verify().unsigned == 0


def test_a_record_edited_inside_a_signed_span_is_named_even_when_relinked(database_url, audit_home):
    log = _log(database_url, audit_home)
    fill(log, 20)
    _sql(log, "update audit_records set status = 500 where seq = 7")
    rep = log.verify()
    assert not rep.ok and rep.first_bad == 7 and "edited" in rep.problem
    _relink(log, 7)  # every link recomputed: the signed checkpoint at 10 no longer matches
    rep = log.verify()
    assert not rep.ok and rep.first_bad == 1 and "rewritten" in rep.problem, rep.problem


def test_cutting_the_tail_loses_at_most_the_unsigned_records(database_url, audit_home):
    log = _log(database_url, audit_home)
    fill(log, 21)  # signed head at 16
    _sql(log, "delete from audit_records where seq > 18")
    _relink(log, 19)  # tip put back to 18
    rep = log.verify()  # the limit of batching: 19–21 were never signed, their loss cannot be seen...
    assert rep.ok and rep.records == 18 and rep.unsigned == 2
    _sql(log, "delete from audit_records where seq > 12")  # ...a cut into the signed span can
    _relink(log, 13)
    rep = log.verify()
    assert not rep.ok and rep.first_bad == 13 and "truncated" in rep.problem


def test_reordered_records_are_named(database_url, audit_home):
    log = _log(database_url, audit_home)
    fill(log, 20)
    _sql(log, "update audit_records set seq = -1 where seq = 4", "update audit_records set seq = 4 where seq = 5")
    _sql(log, "update audit_records set seq = 5 where seq = -1")
    rep = log.verify()
    assert not rep.ok and rep.first_bad in (3, 4), rep.problem
    _relink(log, 4)
    rep = log.verify()
    assert not rep.ok and rep.first_bad == 1 and "rewritten" in rep.problem, rep.problem


def test_forged_checkpoints_and_heads_are_refused(database_url, audit_home):
    log = _log(database_url, audit_home)
    fill(log, 20)
    log.close()
    with log.engine.connect() as c:
        cp = c.execute(sa.text("select * from audit_checkpoints where seq = 10")).first()._asdict()
    _sql(log, "update audit_checkpoints set hash = :h where seq = 10", h="ab" * 32)
    rep = log.verify()
    assert not rep.ok and "invalid signature" in rep.problem
    _sql(log, "update audit_checkpoints set hash = :h where seq = 10", h=cp["hash"])
    assert log.verify().ok
    # a checkpoint made up at record 15, signed with another key
    from codemoat.audit.chain import checkpoint_message
    from codemoat.audit.signing import Signer
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = Signer(Ed25519PrivateKey.generate())
    with log.engine.connect() as c:
        h15 = c.execute(sa.text("select hash from audit_records where seq = 15")).scalar()
    sig = other.sign(checkpoint_message(15, h15, 10, 1, "periodic"))
    _sql(
        log,
        "insert into audit_checkpoints values (15, :h, 10, 1, 'periodic', :k, :s)",
        h=h15,
        k=other.key_id,
        s=sig,
    )
    rep = log.verify()
    assert not rep.ok and "not this machine's audit key" in rep.problem


def test_a_tail_longer_than_any_writer_leaves_is_refused(database_url, audit_home):
    from codemoat.audit.log import AuditLog

    log = _log(database_url, audit_home)
    fill(log, 16)
    assert tuple(_head(log)) == (16, 10)
    # someone without the key appends records after the signed head, linked as a writer would
    keyless = AuditLog(log.engine, checkpoint_every=10, sign_every=10**6, signer=None)
    keyless._timer.arm = lambda: None  # it never signs
    keyless._sign_due = lambda seq: False
    for i in range(log.tail_allowance + 1):
        keyless.append("request", user="mallory", prompt_tokens=i)
    rep = log.verify()
    assert not rep.ok and rep.first_bad == 17 and "more than the" in rep.problem, rep.problem


def test_four_writers_with_batched_signatures_make_one_verifiable_chain(database_url, audit_home):
    from codemoat.audit.signing import load_signer

    key = load_signer()  # made once, before the threads (as `serve` does at start-up)
    logs = [_log(database_url, audit_home, sign_every=5, signer=key) for _ in range(4)]
    ts = [threading.Thread(target=fill, args=(lg, 40, 100 * i)) for i, lg in enumerate(logs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for lg in logs:
        lg.close()
    rep = logs[0].verify()
    assert rep.ok and rep.records == 160 and rep.unsigned == 0, rep.problem
    assert sorted(r["prompt_tokens"] for r in logs[0].records()) == sorted(100 * i + j for i in range(4) for j in range(40))


def test_the_head_file_keeps_the_newest_two_heads_whoever_signs(database_url, audit_home):
    import json

    a, b = _log(database_url, audit_home, sign_every=3), _log(database_url, audit_home, sign_every=3)
    for i in range(4):  # the writers take turns, each with its own descriptor on the one head file
        fill(a if i % 2 else b, 3, 10 * i)
    raw = a.head_file.read_bytes()
    assert sorted(json.loads(raw[i : i + 512])["seq"] for i in (0, 512)) == [9, 12]
    assert a.verify().ok
