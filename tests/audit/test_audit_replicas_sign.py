"""Two replicas on one PostgreSQL (or two processes on one SQLite file) appending at once, each signing its batches (`sign_every` 3) on top of
the other's heads: the writers' check that their last head's record is still in the chain
(audit.heads.sign_tip, `mine`) must never fire on honest interleaving. On SQLite, a signature on its own
(`sign()`, the head timer) read the head and the tip before its transaction began (sqlite3 begins it at
the first write), so two writers signed over each other's heads: a head put back behind a checkpoint,
then 'record N exists beyond the chain's tip' (the duplicate checkpoint's IntegrityError), and the
writer stopped; about one run in three of this test before."""

from __future__ import annotations

import threading

import pytest

from .logs import open_log


# sign_every 1 on PostgreSQL: each append's signature checks that the head holds the record just written
# (`cover`), with the other replica's records linked in between
@pytest.mark.parametrize(("db", "sign_every"), [("pg_url", 3), ("db_url", 3), ("pg_url", 1)])
def test_two_replicas_appending_and_signing_in_turn_stay_healthy(db, sign_every, request, audit_home):
    url = request.getfixturevalue(db)
    logs = [open_log(url, audit_home, sign_every=sign_every, sign_interval_ms=5) for _ in range(2)]
    errors: list[BaseException] = []

    def work(lg, t: int) -> None:
        try:
            for i in range(60):
                lg.append("request", user=f"u{t}", route="/v1/completions", status=200, prompt_tokens=i)
                if i % 7 == 0:
                    lg.sign()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(lg, 2 * n + k), daemon=True) for n, lg in enumerate(logs) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    for lg in logs:
        assert lg.failure is None, lg.failure
        lg.close()  # signs what it left, and its head timer stops: verify reads a chain nobody writes
    rep = open_log(url, audit_home).verify()
    assert rep.ok and rep.records == 240, rep.to_dict()


def test_a_first_head_committed_between_a_signers_reads_is_not_taken_for_a_deleted_one(pg_url, audit_home):
    """PostgreSQL reads each statement of a signature as of its own moment: a signer found no head, then
    another replica's first head committed with its checkpoints, then the signer found checkpoints and took
    the head for deleted ('records exist but the signed head is missing'; the writer stopped). Made
    deterministic: the other replica's transaction holds the checkpoints table until the signer waits on it."""
    import threading

    import sqlalchemy as sa

    from codemoat.audit.heads import sign_tip

    from .logs import fill
    from .test_audit_rotate_live import _until, _waiting_on_locks

    log = open_log(pg_url, audit_home, sign_every=100, sign_interval_ms=10**8)
    fill(log, 12)  # no head yet: a new log's first records
    other = open_log(pg_url, audit_home, sign_every=100, sign_interval_ms=10**8)  # a replica signing its first head
    c = other.engine.connect()
    tx = c.begin()
    c.execute(sa.text("lock table audit_checkpoints in access exclusive mode"))
    signed, _, _ = sign_tip(c, other.signer, checkpoint_every=10)  # the head, and the checkpoint at record 10
    assert signed == 12
    done: dict[str, object] = {}

    def sign() -> None:
        try:
            done["sign"] = log.sign()
        except Exception as e:  # reported below
            done["sign"] = e

    t = threading.Thread(target=sign, daemon=True)
    try:
        t.start()
        _until(lambda: _waiting_on_locks(log.engine) >= 1, "the signer to wait on the checkpoints")
    finally:
        tx.commit()
        c.close()
    t.join(60)
    assert not t.is_alive()
    assert done["sign"] == 12, done
    assert log.failure is None
    fill(log, 2, 20)
    log.sign()
    assert log.verify().ok
