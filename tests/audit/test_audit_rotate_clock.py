"""`codemoat audit rotate` from a host whose clock is behind the replicas', and the chain put back by a DBA.

A writer remembers the last head it signed and stops when that head's record is gone from the chain (a
cut and relink, `test_insider_dba`), unless the chain was rotated since. It used to tell a rotation by
its record's time: one stamped up to 10 minutes before the writer's last head counted. A rotation run
where the clock was further behind (another host, 30 minutes) was taken for a relink: the replica's next
signature stopped its writer and every request it served after got a 503. Now the writer remembers
record 1 as of its signature (its hash and the rotation's number) and a rotation is a later rotation
record in its place, whatever its time. The DBA's side stays closed: an older rotated chain put back
whole (its records and a signed head of it, kept from before) or a rotation record the DBA wrote still
stops the writer.
"""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from .logs import fill, open_log

BACKENDS = ["db_url", "pg_url"]  # SQLite, and the session's real PostgreSQL


@pytest.mark.parametrize("db", BACKENDS)
def test_a_rotation_from_a_host_30_minutes_behind_does_not_stop_a_replica(db, request, audit_home, tmp_path):
    from codemoat.audit.rotate import rotate

    url = request.getfixturevalue(db)
    replica = open_log(url, audit_home, sign_every=1)
    fill(replica, 5)  # each append signed: this replica remembers its head at record 5
    rotator = open_log(url, audit_home, sign_every=1)  # `codemoat audit rotate` on the host that is behind
    behind = time.time() - 30 * 60
    rotate(rotator, tmp_path / "archive.jsonl", now=behind)
    with replica.engine.connect() as c:
        first = c.execute(sa.text("select ts_us from audit_records where seq = 1")).scalar()
        head_ts = c.execute(sa.text("select ts_us from audit_head where id = 1")).scalar()
    assert first == head_ts == int(behind * 1_000_000)  # stamped by the rotating host's clock
    assert fill(replica, 3, 10) == [2, 3, 4]  # the replica signs on
    rep = replica.verify()
    assert rep.ok, rep.to_dict()


def _copy_chain(eng) -> dict:
    """The DBA keeps a copy of the chain as it is now: its records, checkpoints and signed head row."""
    from codemoat.audit.chain import checkpoints, head, records

    with eng.connect() as c:
        return {
            "records": [r._asdict() for r in c.execute(sa.select(records).order_by(records.c.seq))],
            "checkpoints": [r._asdict() for r in c.execute(sa.select(checkpoints))],
            "head": c.execute(sa.select(head)).one()._asdict(),
        }


def _put_chain(eng, rows: list[dict], *, cps: list[dict] = (), head_row: dict | None = None) -> None:
    """The DBA replaces the chain with `rows` (the chain's trigger off, so their numbers and hashes stay as
    given), the checkpoints with `cps`, and the head with `head_row` (None: the head is left as it is)."""
    from codemoat.audit.chain import checkpoints, head, records, tip

    with eng.begin() as c:
        pg = c.dialect.name == "postgresql"
        if pg:
            c.execute(sa.text("alter table audit_records disable trigger audit_chain"))
        c.execute(records.delete())
        c.execute(checkpoints.delete())
        c.execute(records.insert(), rows)
        if cps:
            c.execute(checkpoints.insert(), list(cps))
        if head_row is not None:
            c.execute(head.delete())
            c.execute(head.insert(), [head_row])
        c.execute(tip.update().where(tip.c.id == 1).values(seq=rows[-1]["seq"], hash=rows[-1]["hash"]))
        if pg:
            c.execute(sa.text("alter table audit_records enable trigger audit_chain"))


@pytest.mark.parametrize("db", BACKENDS)
def test_an_older_rotated_chain_put_back_whole_stops_the_replica(db, request, audit_home, tmp_path):
    """Two real rotations; the DBA kept the first rotation's chain and a signed head of it, and puts them back
    after the second (every signature in it is genuine, record 1 is a rotation record, and a recent one):
    not a rotation since the replica's last head, whose chain began with the second rotation."""
    from codemoat.audit.log import AuditUnavailable
    from codemoat.audit.rotate import rotate

    url = request.getfixturevalue(db)
    replica = open_log(url, audit_home, sign_every=1)
    rotator = open_log(url, audit_home, sign_every=1)
    fill(replica, 2)
    rotate(rotator, tmp_path / "one.jsonl")
    fill(replica, 4, 10)  # the first rotation's chain: its record and 4 of the replica's, signed
    kept = _copy_chain(replica.engine)
    rotate(rotator, tmp_path / "two.jsonl")
    fill(replica, 2, 20)  # the replica's last head names record 3 of the second rotation's chain
    _put_chain(replica.engine, kept["records"], cps=kept["checkpoints"], head_row=kept["head"])
    with pytest.raises(AuditUnavailable, match="record 3 no longer matches the signed head"):
        fill(replica, 1, 30)


@pytest.mark.parametrize("db", BACKENDS)
def test_a_rotation_record_the_dba_wrote_stops_the_replica(db, request, audit_home):
    """No rotation: the DBA writes a chain of their own that starts with a rotation record (numbered far
    ahead) in place of the replica's records. The head still names the replica's record 5: the writer stops,
    and verify fails."""
    from codemoat.audit.chain import GENESIS, body_hash, link_hash
    from codemoat.audit.log import AuditUnavailable
    from codemoat.audit.rows import normalise

    url = request.getfixturevalue(db)
    replica = open_log(url, audit_home, sign_every=1)
    fill(replica, 5)
    rows, prev = [], GENESIS
    for i in range(7):
        if i == 0:
            row = normalise("rotation", {"detail": {"records": 0, "rotation": 99, "previous_ok": True}})
        else:
            row = normalise("request", {"user": "alice", "route": "/v1/completions", "status": 200})
        row.update(seq=i + 1, prev_hash=prev)
        row["hash"] = prev = link_hash(i + 1, prev, body_hash(row))
        rows.append(row)
    _put_chain(replica.engine, rows)
    with pytest.raises(AuditUnavailable, match="record 5 no longer matches the signed head"):
        fill(replica, 1, 30)
    rep = open_log(url, audit_home, sign_every=1).verify()
    assert not rep.ok, rep.to_dict()
