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
the chain after all (committed, the answer lost) tells of an answer its client never got. Its fields are kept too
(`doubt`, PostgreSQL only) and looked up when the log takes records again; found, a `withheld` record is appended
that names it (`detail.record`: its seq) and says the client got a 503 instead. Its usage row, quota and metrics
are not written for it (its append raised before them). Not found, nothing is written: a refusal while the log
takes no records is counted (`audit_failures`), not recorded.

A record the database refuses for its own values (`RecordRefused`) would be refused again: it is not kept
(an error line says so). At shutdown what is still kept is written if the log takes it, else each one is
logged on one line (user, route, status, tokens, when it ended), never its text. At most `MAX_KEPT` wait,
holding at most `MAX_KEPT_CHARS` of text; past either the oldest is dropped, with an error line.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import DBAPIError

from ..audit.log import AuditUnavailable
from ..audit.pending import RecordRefused

log = logging.getLogger("codemoat.audit")

#: kept records at most, and the characters of text they hold at most (a kept record holds its request: the
#: prompt as sent, and with audit.retain_text the record's texts; a database out of disk admits every stream)
MAX_KEPT = 10_000
MAX_KEPT_CHARS = 64 << 20


def _summary(fields: dict[str, Any]) -> str:
    return (
        f"user {fields.get('user')!r}, {fields.get('route')}, status {fields.get('status')}, "
        f"{fields.get('prompt_tokens') or 0}+{fields.get('completion_tokens') or 0} tokens"
        + (f", ended {fields['detail']['late']}" if fields["detail"].get("late") else "")
    )


class LateRecords:
    """The kept records of one app (`Trust.late`), written by `write` on the app's event loop."""

    def __init__(
        self,
        write: Callable[..., Any],
        max_kept: int = MAX_KEPT,
        max_chars: int = MAX_KEPT_CHARS,
        written: Callable[[str, dict[str, Any]], int | None] | None = None,
    ):
        self._write = write  # AuditLog.append_async
        self._written = written  # AuditLog.written_already: a kept record that is in the chain after all
        # (fields to write, after, characters, the fields as first appended: with their time, without `late`)
        self._kept: deque[tuple[dict[str, Any], Callable[[], Any], int, dict[str, Any]]] = deque()
        self._chars = 0
        self._lock = threading.Lock()  # `keep` runs on the loop or a worker thread (the synchronous write)
        self._task: asyncio.Task | None = None
        self.max_kept, self.max_chars = max_kept, max_chars
        self._doubts: deque[dict[str, Any]] = deque()  # refused whole answers' records, as first appended (`doubt`)

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def doubts(self) -> int:
        """Refused whole answers whose record may be in the chain, not looked up yet."""
        return len(self._doubts)

    def doubt(self, fields: dict[str, Any]) -> None:
        """A whole answer was replaced by a 503 because its record's append failed, which may have committed all
        the same (`AuditLog.written_already`; PostgreSQL only): look it up once the log takes records again."""
        if self._written is None or fields.get("ts") is None:
            return
        first = {k: v for k, v in fields.items() if k != "also"}  # found, its usage row must not follow it
        with self._lock:
            self._doubts.append(first)
            while len(self._doubts) > self.max_kept:
                old = self._doubts.popleft()
                log.error("more than %d refused answers' records to look up: the oldest is not: %s", self.max_kept, _summary(old))

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
        if (self._kept or self._doubts) and (self._task is None or self._task.done()):
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
        """Look up each refused whole answer's record; one in the chain gets a `withheld` record after it."""
        while True:
            with self._lock:
                if not self._doubts:
                    return True
                first = self._doubts[0]
            try:
                seq = await asyncio.to_thread(self._written, "request", first)  # type: ignore[misc]
                if seq is not None:
                    log.warning(
                        "a refused answer's audit record was in the chain after all (record %d): recording that its "
                        "client got a 503 instead: %s",
                        seq,
                        _summary(first),
                    )
                    await self._write(
                        "withheld",
                        **{k: first.get(k) for k in ("user", "token_id", "route", "protocol", "model", "client")},
                        status=503,
                        detail={"record": seq, "status": first.get("status"), "why": "its record's commit was not confirmed"},
                    )
            except RecordRefused as e:
                log.error("a withheld answer's audit record was refused by the database (%s): %s", e, _summary(first))
            except (AuditUnavailable, DBAPIError):
                return False  # the next request that finds the log writable tries again
            with self._lock:
                if self._doubts and self._doubts[0] is first:
                    self._doubts.popleft()

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
            with self._lock:
                if self._kept and self._kept[0][0] is fields:
                    self._chars -= self._kept.popleft()[2]

    def give_up(self) -> None:
        """At shutdown, once `drain` could not write them: each kept record on one error line."""
        with self._lock:
            kept, self._kept, self._chars = list(self._kept), deque(), 0
        for fields, _, _, _ in kept:
            log.error("shutting down with an audit record the log never took: %s", _summary(fields))
        with self._lock:
            doubts, self._doubts = list(self._doubts), deque()
        for first in doubts:
            log.error(
                "shutting down without knowing whether a refused answer's audit record is in the chain (if it is, "
                "its client got a 503 instead): %s at %s",
                _summary(first),
                first.get("ts"),
            )
