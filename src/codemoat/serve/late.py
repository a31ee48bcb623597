"""Streamed answers whose audit record the log could not take when they ended.

A whole answer is held until its record is written, and replaced by a 503 if it cannot be (`auditing`). A
stream's tokens are the client's as they come: when the log stops taking records between a stream's start
(checked writable then) and its end, the answer has been served and its record was not written. The record
is kept here instead, marked with when the stream ended (`detail.late`), and written once the log takes
records again: the next request that finds the log writable starts that (`start`), oldest first, each with
its usage row, quota and metrics as if on time. The chain stays one chain: a late record is appended at
the tip like any other, its own time is when it was written.

A record may be in the chain although its append failed: on PostgreSQL the connection can be lost with the
answer to the commit, the server then unreachable to read back whether it committed (`audit.pgappend`).
So a kept record is looked up first (`AuditLog.written_already`: the same body at the same time, which the
trust layer sets before the first append) and written only when it is not there; found, its usage row,
quota and metrics follow it then.

A whole answer is different: it is replaced by a 503 when its record's append fails, so a record of it that is in
the chain after all (committed, the answer lost) tells of an answer its client never got. What finds that record
is kept (`doubt`, PostgreSQL only: its time, body hash and a one-line summary, no text) and looked up when the log
takes records again; found, a `withheld` record is appended that names it (`detail.record`: its seq) and says the
client got a 503 instead (a `withheld` record whose own append is in doubt is looked up before it is written
again). Its usage row, quota and metrics are not written for it (its append raised before them). Not found, it is
looked up once more after `FINAL_S` (a statement whose connection was lost may still commit until the server's
`statement_timeout`, `audit.pgappend.STATEMENT_TIMEOUT_S`), then dropped: a refusal while the log takes no
records is counted (`audit_failures`), not recorded. The doubts are on disk too (`serve.doubtstore`): a server that
dies before it could look them up leaves them to the next one, which does not correct a record twice (a `withheld`
record that names it already: `AuditLog.withheld_for`).

A record the database refuses for its own values (`RecordRefused`) would be refused again: it is not kept
(an error line says so). At shutdown what is still kept is written if the log takes it, else each one is
logged on one line (user, route, status, tokens, when it ended), never its text. At most `MAX_KEPT` wait,
holding at most `MAX_KEPT_CHARS` of text; past either the oldest is dropped, with an error line.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import DBAPIError

from ..audit.log import AuditUnavailable
from ..audit.pgappend import STATEMENT_TIMEOUT_S
from ..audit.pending import RecordRefused
from ..errors import CodemoatError
from .doubtstore import DoubtStore

log = logging.getLogger("codemoat.audit")

#: seconds after a refused answer's time past which "its record is not in the chain" is final
FINAL_S = STATEMENT_TIMEOUT_S + 10.0
#: kept records at most, and the characters of text they hold at most (a kept record holds its request: the
#: prompt as sent, and with audit.retain_text the record's texts; a database out of disk admits every stream)
MAX_KEPT = 10_000
MAX_KEPT_CHARS = 64 << 20


def _summary(fields: dict[str, Any]) -> str:
    return (
        f"user {fields.get('user')!r}, {fields.get('route')}, status {fields.get('status')}, "
        f"{fields.get('prompt_tokens') or 0}+{fields.get('completion_tokens') or 0} tokens"
        + (f", ended {late}" if (late := (fields.get("detail") or {}).get("late")) else "")
    )


def _about(d: _Doubt) -> str:
    when = datetime.fromtimestamp(d.ts, UTC).isoformat(timespec="microseconds")
    return f"{_summary(d.facts)}, record time {when}" + (", its withheld record not confirmed" if d.withheld else "")


@dataclass(eq=False)
class _Doubt:
    """A refused whole answer whose record may be in the chain: what finds it, and what a `withheld` record says."""

    ts: float  # when the record was first appended (its `ts`)
    ts_us: int
    body: str  # its body hash (`AuditLog.fingerprint`)
    facts: dict[str, Any]  # user, token_id, route, protocol, model, client, status, tokens: a withheld record's and the log's
    looked: bool = False  # looked up once, not found: looked up again after FINAL_S
    withheld: dict[str, Any] | None = None  # the withheld record's fields once its first append was tried
    settled: bool = False  # looked up and, if its record was found, corrected: gone from the doubts (and their file)
    adopted: bool = False  # left on disk by a server that ended (`serve.doubtstore`)
    tried: float | None = None  # when its withheld record's append was last tried (on disk before each try)

    def waits(self, now: float) -> float:
        """When it is next worth looking up (0: now). A `withheld` record a server that ended was appending may still
        commit until `FINAL_S` after that server's last try (its lost statement cannot be ended from here)."""
        if self.withheld is not None:
            last = max(self.tried or 0.0, self.withheld["ts"]) + FINAL_S
            return last if self.adopted and now < last else 0.0
        return self.ts + FINAL_S if self.looked and now < self.ts + FINAL_S else 0.0


_FACTS = ("user", "token_id", "route", "protocol", "model", "client", "status", "prompt_tokens", "completion_tokens")


class LateRecords:
    """The kept records of one app (`Trust.late`), written by `write` on the app's event loop."""

    def __init__(
        self,
        write: Callable[..., Any],
        max_kept: int = MAX_KEPT,
        max_chars: int = MAX_KEPT_CHARS,
        written: Callable[[str, dict[str, Any]], int | None] | None = None,
        written_as: Callable[[int, str], int | None] | None = None,
        fingerprint: Callable[[str, dict[str, Any]], tuple[int, str]] | None = None,
        on_withheld: Callable[[], Any] = lambda: None,
        store: DoubtStore | None = None,
        withheld_for: Callable[[int], int | None] | None = None,
    ):
        self._write = write  # AuditLog.append_async
        self._written = written  # AuditLog.written_already: a kept record that is in the chain after all
        self._written_as, self._fingerprint = written_as, fingerprint  # AuditLog's: a refused answer's record (`doubt`)
        self._on_withheld = on_withheld  # a withheld record was written (its metric)
        self._due = 0.0  # when the doubts are next worth looking up (0: now; inf: none waits)
        # (fields to write, after, characters, the fields as first appended: with their time, without `late`)
        self._kept: deque[tuple[dict[str, Any], Callable[[], Any], int, dict[str, Any]]] = deque()
        self._chars = 0
        self._lock = threading.Lock()  # `keep` runs on the loop or a worker thread (the synchronous write)
        self._task: asyncio.Task | None = None
        self.max_kept, self.max_chars = max_kept, max_chars
        self._doubts: deque[_Doubt] = deque()  # refused whole answers whose record may be in the chain (`doubt`)
        self._withheld_for = withheld_for  # AuditLog.withheld_for: a record corrected already (a doubt adopted twice)
        self._store = store  # the doubts on disk, for the next server if this one dies first (`serve.doubtstore`)
        self._io = threading.Lock()  # the doubts and their file change together (a line written twice: two lookups)
        if store is not None:
            self._adopt(store)

    def _adopt(self, store: DoubtStore) -> None:
        """The doubts a server that ended left unsettled: looked up as this one's own."""
        try:
            adopted = store.adopt()
        except Exception:
            log.exception("could not read the refused answers a server that ended left to look up")
            return
        merged: dict[tuple[int, str], dict[str, Any]] = {}  # one doubt in two files: the one further along
        for x in adopted:
            key = (x["ts_us"], x["body"])
            was = merged.get(key)
            if was is None or (x.get("withheld") is not None, x.get("tried") or 0.0) >= (
                was.get("withheld") is not None,
                was.get("tried") or 0.0,
            ):
                merged[key] = x
        keep = sorted(merged.values(), key=lambda x: x["ts_us"])
        if len(keep) > self.max_kept:
            log.error(
                "%d refused answers left to look up by servers that ended: the oldest %d are not",
                len(keep),
                len(keep) - self.max_kept,
            )
            keep = keep[-self.max_kept :]
        for x in keep:
            self._doubts.append(
                _Doubt(
                    float(x["ts"]), x["ts_us"], x["body"], x["facts"], bool(x.get("looked")), x.get("withheld"),
                    adopted=True, tried=x.get("tried"),
                )
            )  # fmt: skip
        self._due = 0.0
        if adopted:
            with self._io:
                self._stored()  # this process's file holds them once each

    def _stored(self, *changed: _Doubt) -> bool:
        """Write the doubts to their file (under `_io`): the `changed` ones appended (a later line of a doubt replaces
        its earlier ones; a settled one's says so), else all of them again, as also after every `max_kept` lines.
        Whether they are on disk (True without a store)."""
        if self._store is None:
            return True
        try:
            if changed:
                self._store.add([vars(d) for d in changed])
            with self._lock:
                now = [vars(d) for d in self._doubts]
            if not changed or self._store.appended >= self.max_kept or not now:  # the file stays bounded, or goes
                self._store.write(now)
        except (OSError, CodemoatError) as e:
            log.error(
                "could not write the refused answers to look up to disk (a server that dies now leaves them unknown): %s", e
            )
            return False
        return True

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def doubts(self) -> int:
        """Refused whole answers whose record may be in the chain, not settled yet."""
        return len(self._doubts)

    def doubt(self, fields: dict[str, Any]) -> None:
        """A whole answer was replaced by a 503 because its record's append failed, which may have committed all
        the same (`AuditLog.written_as`; PostgreSQL only): look it up once the log takes records again. Only its
        time, body hash and facts are kept (no text); at most `max_kept`."""
        if self._written_as is None or self._fingerprint is None or fields.get("ts") is None:
            return
        ts_us, body = self._fingerprint("request", fields)
        d = _Doubt(float(fields["ts"]), ts_us, body, {k: fields.get(k) for k in _FACTS})
        with self._io:
            with self._lock:
                self._doubts.append(d)
                self._due = 0.0
                while len(self._doubts) > self.max_kept:
                    old = self._doubts.popleft()
                    log.error(
                        "more than %d refused answers' records to look up: the oldest is not: %s", self.max_kept, _about(old)
                    )
            self._stored(d)

    def keep(self, fields: dict[str, Any], after: Callable[[], Any], why: BaseException, chars: int = 0) -> None:
        """Keep a delivered stream's record that the log did not take (`why`), to be written later; `chars`:
        the characters of text it holds (its request's prompt, the record's texts)."""
        first = fields  # a late record's own time is when it is written: not the first append's `ts`
        fields = {k: v for k, v in fields.items() if k != "ts"}
        fields["detail"] = {**fields["detail"], "late": datetime.now(UTC).isoformat(timespec="seconds")}
        if isinstance(why, RecordRefused):  # its values: it would be refused again
            log.error("a streamed answer's audit record was refused by the database (%s) and is lost: %s", why, _summary(fields))
            return
        dropped = []
        with self._lock:
            self._kept.append((fields, after, chars, first))
            self._chars += chars
            while len(self._kept) > 1 and (len(self._kept) > self.max_kept or self._chars > self.max_chars):
                old, _, c, _ = self._kept.popleft()
                self._chars -= c
                dropped.append(old)
            n = len(self._kept)
        log.error(
            "the audit log could not take a streamed answer's record when it ended (%s); kept to be written "
            "once it takes records again (%d waiting): %s",
            why,
            n,
            _summary(fields),
        )
        for old in dropped:
            log.error(
                "more than %d audit records or %d characters of their text waiting: the oldest is dropped: %s",
                self.max_kept,
                self.max_chars,
                _summary(old),
            )

    def start(self) -> None:
        """Write the kept records in the background (on the running loop), unless that is under way."""
        if (self._kept or (self._doubts and time.time() >= self._due)) and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def drain(self) -> bool:
        """Write the kept records, oldest first, until one is not taken; whether none is left. After the
        background drain under way (`start`), if any: both read the oldest kept record, and while one was
        writing it the other wrote it again (the request twice in the log, its usage counted twice)."""
        task = self._task
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            await asyncio.wait({task})  # not cancelled by a caller's deadline: it finishes its record
        return await self._drain()

    async def _drain(self) -> bool:
        return await self._drain_kept() and await self._settle_doubts()

    async def _settle_doubts(self) -> bool:
        """Look up the refused answers' records that are due; one in the chain gets a `withheld` record after it.
        Whether none is left to look up now (some may wait for `FINAL_S`)."""
        with self._lock:
            todo = list(self._doubts)
        was = [(d.looked, d.withheld, d.settled, d.tried) for d in todo]
        try:
            return await self._settle_each(todo)
        finally:  # what changed goes to the file at once (no await here: a cancelled drain still writes it)
            changed = [d for d, w in zip(todo, was) if w != (d.looked, d.withheld, d.settled, d.tried)]
            if self._store is not None and changed:
                with self._io:
                    self._stored(*changed)

    async def _settle_each(self, todo: list[_Doubt]) -> bool:
        for d in todo:
            if d.waits(time.time()):
                continue
            try:
                settled = await self._settle(d)
            except RecordRefused as e:
                log.error("a withheld answer's audit record was refused by the database (%s): %s", e, _about(d))
                settled = True
            except (AuditUnavailable, DBAPIError):
                return False  # the next request that finds the log writable tries again
            except Exception:
                log.exception("could not look up a refused answer's audit record: %s", _about(d))
                return False
            if settled:
                d.settled = True
                with self._lock:
                    if d in self._doubts:
                        self._doubts.remove(d)
        with self._lock:  # the earliest a waiting one is worth looking up again
            now = time.time()
            self._due = min((d.waits(now) for d in self._doubts), default=float("inf"))
        return True

    async def _settle(self, d: _Doubt) -> bool:
        """Look `d` up, and write its `withheld` record if its record is in the chain; whether it is settled."""
        if d.withheld is not None:  # its withheld record's append failed: in the chain all the same? (or another's?)
            named = d.withheld["detail"]["record"]
            if await asyncio.to_thread(self._written, "withheld", d.withheld) is None and (  # type: ignore[misc]
                self._withheld_for is None or await asyncio.to_thread(self._withheld_for, named) is None
            ):
                self._trying(d)
                await self._write("withheld", **d.withheld)
                self._on_withheld()
            return True
        seq = await asyncio.to_thread(self._written_as, d.ts_us, d.body)  # type: ignore[misc]
        if seq is None:  # not committed; final once a statement lost with its connection cannot commit any more
            d.looked = True
            if d.adopted and time.time() >= d.ts + FINAL_S:
                log.info(
                    "a refused answer's audit record left to look up by a server that ended is not in the chain: %s", _about(d)
                )
            return time.time() >= d.ts + FINAL_S
        if self._withheld_for is not None and (w := await asyncio.to_thread(self._withheld_for, seq)) is not None:
            log.warning("a refused answer's audit record (record %d) was corrected already (record %d): %s", seq, w, _about(d))
            return True  # a doubt on disk whose settling the file missed (its server died between the two)
        log.warning(
            "a refused answer's audit record was in the chain after all (record %d): recording that its client got "
            "a 503 instead: %s",
            seq,
            _about(d),
        )
        f = d.facts
        d.withheld = {k: f.get(k) for k in ("user", "token_id", "route", "protocol", "model", "client")} | {
            "ts": time.time(),
            "status": 503,
            "detail": {"record": seq, "status": f.get("status"), "why": "its record's commit was not confirmed"},
        }
        self._trying(d)
        await self._write("withheld", **d.withheld)
        self._on_withheld()
        return True

    def _trying(self, d: _Doubt) -> None:
        """A withheld record's append is about to be tried: on disk first, with when (one line appended), so that a
        server that takes it over looks it up, and waits for this try's statement, before it writes it again."""
        d.tried = time.time()
        with self._io:
            if not self._stored(d):  # not tried: a server that took it over could not know to wait for it
                raise AuditUnavailable("the refused answers to look up could not be written to disk")

    async def _drain_kept(self) -> bool:
        while True:
            with self._lock:
                if not self._kept:
                    return True
                fields, after, _, first = self._kept[0]
            try:
                seq = None if self._written is None else await asyncio.to_thread(self._written, "request", first)
                if seq is None:
                    await self._write("request", then=after, **fields)
                else:
                    log.warning(
                        "a kept audit record was in the chain after all (record %d): not written again: %s", seq, _summary(fields)
                    )
                    await asyncio.to_thread(after)
            except RecordRefused as e:
                log.error("a late audit record was refused by the database (%s) and is lost: %s", e, _summary(fields))
            except (AuditUnavailable, DBAPIError):
                return False  # still not taken: the next request that finds the log writable tries again
            except Exception:  # a pool timeout, say: tried again with the next request, not the end of the task
                log.exception("could not write a late audit record: %s", _summary(fields))
                return False
            with self._lock:
                if self._kept and self._kept[0][0] is fields:
                    self._chars -= self._kept.popleft()[2]

    def give_up(self) -> None:
        """At shutdown, once `drain` could not write them: each kept record on one error line."""
        with self._lock:
            kept, self._kept, self._chars = list(self._kept), deque(), 0
        for fields, _, _, _ in kept:
            log.error("shutting down with an audit record the log never took: %s", _summary(fields))
        with self._io:  # the file stays as it is, for the next server (a drain still running writes nothing now)
            store, self._store = self._store, None
            with self._lock:
                doubts, self._doubts = list(self._doubts), deque()
        for d in doubts:
            log.error(
                "shutting down without knowing whether a refused answer's audit record is in the chain (if it is, "
                "its client got a 503 instead)%s: %s",
                "; left on disk for the next server to look up" if store is not None else "",
                _about(d),
            )
