"""`LateRecords.doubt` bookkeeping (`serve/late.py`), on a real audit log on PostgreSQL: what is kept of a refused
answer (no text), how many, what shutdown says of them, and a `withheld` record whose own append was lost after
it committed, which must not be written twice."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from codemoat.audit.log import AuditUnavailable
from codemoat.serve.late import LateRecords

from .logs import open_log

SECRET = "sk-live-0123456789abcdef0123456789abcdef"


def _fields(i: int = 0) -> dict:
    return {
        "ts": time.time() + i * 1e-3,
        "user": "alice",
        "token_id": "t1",
        "route": "/v1/completions",
        "status": 200,
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "prompt_text": f"def f(): return '{SECRET}'",
        "completion_text": "pass",
        "detail": {"method": "POST"},
    }


def _late(log, write=None, **kw) -> LateRecords:
    return LateRecords(
        write or log.append_async, written=log.written_already, written_as=log.written_as, fingerprint=log.fingerprint, **kw
    )


def test_doubts_keep_no_text_are_bounded_and_named_at_shutdown(pg_url, audit_home, caplog):
    caplog.set_level(logging.ERROR, logger="codemoat.audit")
    log = open_log(pg_url, audit_home)
    late = _late(log, max_kept=3)
    for i in range(5):
        late.doubt(_fields(i))
    assert late.doubts == 3
    assert SECRET not in repr(list(late._doubts))  # its time and body hash find it; its text is not needed
    assert caplog.text.count("refused answers' records to look up: the oldest is not") == 2
    caplog.clear()
    late.give_up()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("user 'alice', /v1/completions, status 200" in x for x in lines)
    assert SECRET not in caplog.text and late.doubts == 0


def test_a_withheld_record_whose_append_was_lost_after_it_committed_is_written_once(pg_url, audit_home):
    log = open_log(pg_url, audit_home)
    fields = _fields()
    seq = log.append("request", **fields)  # committed; its writer was told it failed (the 503 went out)
    lost: list[int] = []

    async def write(kind: str, **kw):
        got = await log.append_async(kind, **kw)
        if kind == "withheld" and not lost:  # committed, then the answer to the commit is lost
            lost.append(got)
            raise AuditUnavailable("the connection was lost with the commit's answer")
        return got

    late = _late(log, write)
    late.doubt(fields)
    assert asyncio.run(late.drain()) is False and late.doubts == 1 and lost
    assert asyncio.run(late.drain()) is True and late.doubts == 0
    withheld = list(log.records(kind="withheld"))
    assert len(withheld) == 1, withheld
    detail = withheld[0]["detail"]
    assert (json.loads(detail) if isinstance(detail, str) else detail)["record"] == seq
    assert log.verify().ok


def _store_files(folder) -> list[str]:
    return sorted(p.name.split(".", 1)[1] for p in folder.iterdir()) if folder.exists() else []


def test_a_server_that_dies_with_doubts_leaves_them_to_the_next_and_not_to_one_beside_it(pg_url, audit_home, tmp_path):
    """A refused answer's doubt is on disk as it is kept (no text). The server dies before it could look it up: the
    next server takes it over, looks it up, writes the `withheld` record once, and the files go. A server running
    beside it keeps its own doubts: nobody takes them over while it lives."""
    import os

    from codemoat.serve.doubtstore import DoubtStore

    folder = tmp_path / "audit-doubts"
    log = open_log(pg_url, audit_home)
    fields = _fields()
    seq = log.append("request", **fields)  # committed; its writer was told it failed (the 503 went out)
    dead = DoubtStore(folder)
    _late(log, store=dead, withheld_for=log.withheld_for).doubt(fields)
    text = dead.path.read_text()
    assert len(text.splitlines()) == 1 and SECRET not in text and '"user":"alice"' in text
    beside = _late(log, store=DoubtStore(folder), withheld_for=log.withheld_for)
    beside.doubt(_fields(5))  # a live server's own doubt (no record of it in the chain)
    os.close(dead._lock_fd)  # the first server dies: the kernel releases its lock, its files stay
    nxt = _late(log, store=DoubtStore(folder), withheld_for=log.withheld_for)
    assert nxt.doubts == 1, "the next server did not take over the dead one's doubt, or took the live one's"
    assert asyncio.run(nxt.drain()) is True and nxt.doubts == 0
    withheld = list(log.records(kind="withheld"))
    assert [json.loads(w["detail"]) if isinstance(w["detail"], str) else w["detail"] for w in withheld][0]["record"] == seq
    assert len(withheld) == 1
    assert not dead.path.exists() and not (folder / f"{dead.id}.lock").exists(), "the dead server's files stayed"
    assert not nxt._store.path.exists(), "the next server's file still lists the settled doubt"
    assert _store_files(folder) == ["jsonl", "lock", "lock"]  # the live server's two, the next one's lock
    assert beside.doubts == 1 and beside._store.path.exists()
    assert _late(log, store=DoubtStore(folder), withheld_for=log.withheld_for).doubts == 0
    assert log.verify().ok


def test_a_doubt_on_disk_whose_record_was_corrected_already_is_not_corrected_again(pg_url, audit_home, tmp_path):
    """A server corrected a record, then died before its file said so (or two servers took one file over): the next
    one finds the `withheld` record already there and writes no second one."""
    import os

    from codemoat.serve.doubtstore import DoubtStore

    folder = tmp_path / "audit-doubts"
    log = open_log(pg_url, audit_home)
    fields = _fields()
    log.append("request", **fields)
    first = DoubtStore(folder)
    late = _late(log, store=first, withheld_for=log.withheld_for)
    late.doubt(fields)
    line = first.path.read_bytes()
    assert asyncio.run(late.drain()) is True and len(list(log.records(kind="withheld"))) == 1
    first.path.write_bytes(line)  # its file as it was before the correction
    os.close(first._lock_fd)
    nxt = _late(log, store=DoubtStore(folder), withheld_for=log.withheld_for)
    assert nxt.doubts == 1
    assert asyncio.run(nxt.drain()) is True and nxt.doubts == 0
    assert len(list(log.records(kind="withheld"))) == 1, "the record was corrected twice"


def test_a_doubts_file_that_is_not_one_is_skipped_line_by_line_and_a_link_is_refused(pg_url, audit_home, tmp_path, caplog):
    """A torn or edited line is skipped with an error line, the others are taken over; a doubts file that is a
    symbolic link (to a file of the attacker's choosing) is not read, nor removed, nor is its target."""
    from codemoat.serve.doubtstore import DoubtStore, encode

    caplog.set_level(logging.ERROR, logger="codemoat.audit")
    folder = tmp_path / "audit-doubts"
    folder.mkdir(mode=0o700)
    good = {"ts": time.time(), "ts_us": 123, "body": "ab" * 32, "facts": {"user": "alice", "status": 200}}
    (folder / "1-aa.lock").write_bytes(b"")
    W = {"user": "alice", "token_id": None, "route": None, "protocol": None, "model": None, "client": None, "ts": 1.0}
    W |= {"status": 503, "detail": {"record": 1, "status": 200, "why": "its record's commit was not confirmed"}}
    forged = [  # a withheld record's fields go into the chain: only the ones `_settle` makes
        {**good, "withheld": {"ts": 1.0, "status": 503, "detail": {"record": 1}, "prompt_text": "x"}},
        {**good, "withheld": {"ts": 1.0, "status": 503, "detail": {"record": "1"}}},
        {**good, "facts": {"user": {"nested": 1}}},
        {**good, "withheld": {**W, "user": "mallory"}},  # a correction in another user's name
        {**good, "ts": float("nan")},
    ]
    (folder / "1-aa.jsonl").write_bytes(
        b'{"ts": "x"}\n[1,2]\n'
        + b"[" * 100_000
        + b"\n"
        + b"".join(map(encode, forged))
        + encode(good)
        + encode({**good, "ts_us": 124, "withheld": W})
        + encode({**good, "ts_us": 125})
        + encode({**good, "ts_us": 125, "settled": True})
        + b'{"ts": 1.0, "ts_'
    )  # fmt: skip: a doubt's later line replaces its earlier ones (125: settled, not taken over)
    target = tmp_path / "elsewhere.jsonl"
    target.write_bytes(encode({**good, "ts_us": 456}))
    (folder / "2-bb.lock").write_bytes(b"")
    (folder / "2-bb.jsonl").symlink_to(target)
    log = open_log(pg_url, audit_home)
    late = _late(log, store=DoubtStore(folder), withheld_for=log.withheld_for)
    assert [(d.ts_us, d.facts["user"], d.withheld) for d in late._doubts] == [(123, "alice", None), (124, "alice", W)]
    assert caplog.text.count("is not a refused answer to look up: skipped") == 9
    assert "symbolic link" in caplog.text and target.exists() and (folder / "2-bb.jsonl").is_symlink()


def test_one_doubt_in_two_files_is_adopted_once_the_file_stays_bounded_and_each_chain_has_its_folder(
    pg_url, audit_home, tmp_path
):
    """The same doubt left in two files (a server that took one over, then died) is looked up once; a server refusing
    answers for a long time rewrites its file now and then (at most `max_kept` more lines than it keeps), and the
    next takes over the newest `max_kept`; a lock left under its temporary name by a process that died is removed,
    one its process is taking is not; two databases in one home have two folders."""
    import fcntl
    import os

    from codemoat.serve.doubtstore import DoubtStore, encode, folder_for

    folder = tmp_path / "audit-doubts"
    folder.mkdir(mode=0o700)
    one = {"ts": time.time(), "ts_us": 7, "body": "cd" * 32, "facts": {"user": "bob"}}
    for name in ("1-aa", "2-bb"):
        (folder / f"{name}.lock").write_bytes(b"")
        (folder / f"{name}.jsonl").write_bytes(encode(one))
    (folder / "3-cc.new").write_bytes(b"")  # a process that died before it renamed its lock into place
    taking = folder / "4-dd.new"  # one that is taking its lock now
    taking.write_bytes(b"")
    held = os.open(taking, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    log = open_log(pg_url, audit_home)
    try:
        assert [d.ts_us for d in _late(log, store=DoubtStore(folder))._doubts] == [7]
        assert not (folder / "3-cc.new").exists() and taking.exists()
    finally:
        os.close(held)
    store = DoubtStore(tmp_path / "other")
    busy = _late(log, store=store, max_kept=3)
    for i in range(20):
        busy.doubt(_fields(i))
        assert len(store.path.read_bytes().splitlines()) <= 2 * 3
    os.close(store._lock_fd)
    nxt = _late(log, store=DoubtStore(tmp_path / "other"), max_kept=3)
    assert [d.ts for d in nxt._doubts] == [d.ts for d in busy._doubts]
    home = tmp_path / "home"
    assert folder_for(home, "postgresql://a/x") != folder_for(home, "postgresql://a/y") == folder_for(home, "postgresql://a/y")


def test_a_withheld_record_a_dead_server_was_appending_is_waited_for_not_written_again(pg_url, audit_home, tmp_path, monkeypatch):
    """The withheld record is on disk before its append. The server dies with that append lost on the way, a statement
    the database may still commit (this server cannot end it): the next server looks it up only once `FINAL_S` has
    passed since its time, finds it committed meanwhile, and does not write it again."""
    import os

    from codemoat.serve import late as late_mod
    from codemoat.serve.doubtstore import DoubtStore

    folder = tmp_path / "audit-doubts"
    log = open_log(pg_url, audit_home)
    fields = _fields()
    seq = log.append("request", **fields)
    seen: list[str] = []
    dead = DoubtStore(folder)

    async def lost(kind: str, **kw):
        seen.append(dead.path.read_text())  # what a server taking over would find at this moment
        raise AuditUnavailable("the connection was lost with the INSERT on its way")

    late = _late(log, lost, store=dead, withheld_for=log.withheld_for)
    late.doubt(fields)
    assert asyncio.run(late.drain()) is False
    assert seen and '"withheld":{' in seen[0], "the withheld record was appended before it was on disk"
    w = dict(late._doubts[0].withheld)
    os.close(dead._lock_fd)  # dies
    nxt = _late(log, store=DoubtStore(folder), withheld_for=log.withheld_for)
    assert nxt.doubts == 1 and asyncio.run(nxt.drain()) is True and nxt.doubts == 1
    assert list(log.records(kind="withheld")) == [], "written while the dead server's statement could still commit"
    log.append("withheld", **{**w, "ts": w["ts"] + 1e-3})  # that statement commits (or another server's correction)
    monkeypatch.setattr(late_mod, "FINAL_S", 0.0)
    assert asyncio.run(nxt.drain()) is True and nxt.doubts == 0
    withheld = list(log.records(kind="withheld"))
    detail = withheld[0]["detail"]
    assert len(withheld) == 1 and (json.loads(detail) if isinstance(detail, str) else detail)["record"] == seq


def test_a_withheld_record_retried_long_after_its_first_try_is_waited_for_from_the_retry(pg_url, audit_home, tmp_path):
    """The wait for a dead server's withheld append runs from its last try, not from the record's time: a retry sent
    long after the first try (the database unreachable meanwhile), lost on its way, may commit until `FINAL_S` after
    the retry."""
    import os

    from codemoat.serve.doubtstore import DoubtStore

    folder = tmp_path / "audit-doubts"
    log = open_log(pg_url, audit_home)
    fields = _fields()
    log.append("request", **fields)

    async def lost(kind: str, **kw):
        raise AuditUnavailable("the connection was lost with the INSERT on its way")

    dead = DoubtStore(folder)
    late = _late(log, lost, store=dead, withheld_for=log.withheld_for)
    late.doubt(fields)
    assert asyncio.run(late.drain()) is False
    late._doubts[0].withheld["ts"] -= 600  # the first try was ten minutes ago; this retry is now
    assert asyncio.run(late.drain()) is False
    os.close(dead._lock_fd)
    nxt = _late(log, store=DoubtStore(folder), withheld_for=log.withheld_for)
    assert asyncio.run(nxt.drain()) is True and nxt.doubts == 1
    assert list(log.records(kind="withheld")) == [], "written while the retry's statement could still commit"


def test_shutdown_leaves_the_file_as_it_is_even_with_a_drain_still_running(pg_url, audit_home, tmp_path):
    """`give_up` at shutdown while a background drain still runs (the 5 s before it had not finished it): the drain
    ends after, and must not write the file that the next server is to take over (it removed it, the doubts emptied)."""
    from codemoat.serve.doubtstore import DoubtStore

    log = open_log(pg_url, audit_home)
    store = DoubtStore(tmp_path / "audit-doubts")
    late = None

    def looked_up_while_shutting_down(ts_us: int, body: str):
        late.give_up()  # shutdown comes while this lookup runs
        return None

    late = LateRecords(log.append_async, written=log.written_already, written_as=looked_up_while_shutting_down,
                       fingerprint=log.fingerprint, store=store)  # fmt: skip
    late.doubt(_fields())
    before = store.path.read_bytes()
    assert asyncio.run(late.drain()) is True and late.doubts == 0
    assert store.path.read_bytes() == before, "the drain that ended after the shutdown rewrote or removed the file"


def test_a_withheld_append_is_not_tried_when_its_try_could_not_be_written_to_disk(pg_url, audit_home, tmp_path):
    """A server that took the doubt over could not know to wait for a try it never saw on disk: no try then."""
    from codemoat.serve.doubtstore import DoubtStore

    log = open_log(pg_url, audit_home)
    fields = _fields()
    log.append("request", **fields)
    store = DoubtStore(tmp_path / "audit-doubts")
    tried: list[str] = []

    async def write(kind: str, **kw):
        tried.append(kind)
        return await log.append_async(kind, **kw)

    late = _late(log, write, store=store, withheld_for=log.withheld_for)
    late.doubt(fields)
    real_add = store.add

    def full(doubts):
        raise OSError(28, "No space left on device")

    store.add = full
    assert asyncio.run(late.drain()) is False and tried == [] and late.doubts == 1
    store.add = real_add
    assert asyncio.run(late.drain()) is True and tried == ["withheld"] and late.doubts == 0


def test_a_file_taken_over_that_cannot_be_removed_is_not_taken_over_again_while_its_taker_lives(
    pg_url, audit_home, tmp_path, monkeypatch
):
    import os

    from codemoat.serve import doubtstore
    from codemoat.serve.doubtstore import DoubtStore, encode

    folder = tmp_path / "audit-doubts"
    folder.mkdir(mode=0o700)
    (folder / "1-aa.lock").write_bytes(b"")
    (folder / "1-aa.jsonl").write_bytes(encode({"ts": time.time(), "ts_us": 9, "body": "ef" * 32, "facts": {"user": "eve"}}))
    real_unlink = os.unlink

    def stuck(path, *a, **kw):
        if str(path).endswith("1-aa.jsonl"):
            raise PermissionError(1, "Operation not permitted")
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(doubtstore.os, "unlink", stuck)
    log = open_log(pg_url, audit_home)
    first = _late(log, store=DoubtStore(folder))
    assert first.doubts == 1
    monkeypatch.setattr(doubtstore.os, "unlink", real_unlink)
    assert _late(log, store=DoubtStore(folder)).doubts == 0, "a second live server took over the same doubt"
