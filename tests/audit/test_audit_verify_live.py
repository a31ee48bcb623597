"""`codemoat audit verify` beside a busy server: a writer appending (and signing) all the while. Verify read
the checkpoints, the head, the records and the head file one after another, each as of its own moment:
a head signed in between named records appended after the head was read ('records X–Y were added after
the signed head': with `sign_every = 1` no tail is allowed), or the head file named a record the records
read did not reach ('the log was truncated'). 30 of 31 verifies of a busy SQLite log failed so before.
Now one snapshot of the database, the head file read before it."""

from __future__ import annotations

import threading

import pytest

from waiting import wait_for

from .logs import fill, open_log


# each backend's default: every record on SQLite (signed in its append's transaction), 64 on PostgreSQL (a
# record is committed before a head names it: a tail, within what verify allows); and PostgreSQL with every
# record signed, which still commits a record before its head: a verify between the two saw 'records N-N
# were added after the signed head' (no tail allowed) and failed an honest log
@pytest.mark.parametrize(("db", "sign_every"), [("db_url", 1), ("pg_url", 64), ("pg_url", 1)])
def test_verify_beside_a_writer_that_appends_and_signs_all_the_while(db, sign_every, request, audit_home):
    url = request.getfixturevalue(db)
    writer = open_log(url, audit_home, sign_every=sign_every, checkpoint_every=2)
    written = [0]
    stop = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while not stop.is_set():
                written[0] = writer.append("request", user="alice", route="/v1/completions", status=200)
        except BaseException as e:  # reported below
            errors.append(e)

    writer.append("request", user="alice", route="/v1/completions", status=200)
    writer.sign()  # the machine's key exists before verify looks for it (else: 'no audit-signing key', rightly)
    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        verifier = open_log(url, audit_home, sign_every=sign_every, checkpoint_every=2)  # `codemoat audit verify`
        for _ in range(10):
            seen = written[0]
            assert wait_for(lambda: written[0] > seen + 3 or bool(errors), 60)
            rep = verifier.verify()
            assert rep.ok, rep.problem
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors


@pytest.mark.parametrize("db", ["db_url", "pg_url"])
def test_with_every_record_signed_a_tail_past_what_can_be_in_flight_still_fails(db, request, audit_home):
    """The attacker's side of the allowance above: records someone without the key appends after the signed
    head. SQLite with `sign_every = 1` still allows none; PostgreSQL allows what replicas can have committed
    and not signed yet (a group commit in flight), and one more record fails."""
    from codemoat.audit.heads import MAX_BATCH
    from codemoat.audit.log import AuditLog

    url = request.getfixturevalue(db)
    log = open_log(url, audit_home, sign_every=1)
    fill(log, 3)
    assert log.tail_allowance == (0 if db == "db_url" else 4 + MAX_BATCH)
    keyless = AuditLog(log.engine, checkpoint_every=10, sign_every=10**6, signer=None)  # no key: it never signs
    keyless._timer.arm = lambda: None
    keyless._sign_due = lambda seq: False
    for i in range(log.tail_allowance):
        keyless.append("request", user="mallory", route="/v1/completions", status=200, prompt_tokens=i)
    rep = log.verify()
    assert rep.ok and rep.unsigned == log.tail_allowance, rep.to_dict()
    keyless.append("request", user="mallory", route="/v1/completions", status=200)
    rep = log.verify()
    assert not rep.ok and rep.first_bad == 4 and "added after the signed head" in rep.problem, rep.to_dict()
