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
        f"{fields.get('prompt_tokens') or 0}+{fields.get('completion_tokens') or 0} tokens, "
        f"ended {fields['detail'].get('late')}"
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

    def __len__(self) -> int:
        return len(self._kept)

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
        if self._kept and (self._task is None or self._task.done()):
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
