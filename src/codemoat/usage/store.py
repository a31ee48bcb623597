"""Writing usage: one row per successful completion or chat, one per editor event.

`UsageStore.record(...)` is called by the serve trust layer with a request's audit record, in the
record's transaction where it can (`AuditLog.append(also=...)`: one commit for both). It keeps
numbers and values from fixed sets only: no prompt or completion text (the audit log keeps that,
redacted, when `audit.retain_text` is on), no path, and a completion id
only when it has the shape of one this server handed out. An event is tied to the completion it
names only when the same user received that completion; a repeated (completion, type) event is
stored once, whatever its choice index (every completion has one choice), so replaying `select`,
or sending one per choice index, cannot raise the acceptance rate; a select of a completion no view
was reported for stores that view too (taken, so shown), so selects never outnumber views. Each row is added
to the daily roll-up (rollup.py) in the same transaction.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from datetime import UTC, datetime
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy import Engine

from . import rollup
from .languages import UNKNOWN, language_of
from .tables import completions, events

log = logging.getLogger("codemoat.usage")

COMPLETION_ROUTES = frozenset({"/v1/completions", "/api/generate", "/infill"})
CHAT_ROUTES = frozenset({"/v1/chat/completions", "/api/chat"})
EVENT_TYPES = frozenset({"view", "select", "dismiss"})
SELECT_KINDS = frozenset({"line", "block"})
COMPLETION_ID = re.compile(r"cmpl-[0-9a-f]{24}")  # codemoat.protocol.common.new_id("cmpl"); fullmatch, not `$`
_ROW = (
    "completion_id", "ts", "day", "user", "kind", "language", "protocol", "prompt_tokens", "completion_tokens",
    "latency_ms", "retrieval", "status", "chars", "lines", "first_line_chars",
)  # fmt: skip
_INSERT_COMPLETION = completions.insert().values({k: sa.bindparam(k) for k in _ROW})


class Facts(Protocol):
    """What the trust layer knows of one request (`codemoat.serve.usage.Usage` has these fields)."""

    protocol: str | None
    prompt_tokens: int
    completion_tokens: int
    snippets: list[str]
    completion_text: str
    event: str | None
    completion_id: str | None
    choice_index: int | None
    select_kind: str | None
    language: str | None


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d")


def completion_id_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and COMPLETION_ID.fullmatch(value) else None


def shape(text: str) -> tuple[int, int, int]:
    """(characters, lines, characters of the first line) of a completion: what accepting it puts into the editor."""
    return len(text), (text.count("\n") + 1 if text else 0), len(text.split("\n", 1)[0])


class UsageStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    def _begin(self, conn: sa.Connection | None):
        """The caller's transaction `conn`, or one of our own."""
        return contextlib.nullcontext(conn) if conn is not None else self.engine.begin()

    def record(
        self,
        user: str,
        route: str,
        status: int,
        latency_ms: float,
        facts: Facts,
        *,
        now: float | None = None,
        conn: sa.Connection | None = None,
    ) -> str | None:
        """Store what `facts` says about one finished request (in transaction `conn` if given); returns
        "completion", "chat", "event" or None (not usage)."""
        if not 200 <= status < 300 or not user:
            return None
        ts = time.time() if now is None else now
        if facts.event:
            self.record_event(
                user,
                facts.event,
                completion_id=facts.completion_id,
                choice_index=facts.choice_index,
                select_kind=facts.select_kind,
                protocol=facts.protocol,
                now=ts,
                conn=conn,
            )
            return "event"
        kind = "chat" if route in CHAT_ROUTES else "completion" if route in COMPLETION_ROUTES else None
        if kind is None:
            return None
        chars, lines, first = shape(facts.completion_text or "")
        row = dict(
            completion_id=completion_id_or_none(facts.completion_id),
            ts=ts,
            day=day_of(ts),
            user=user,
            kind=kind,
            language=language_of(facts.language),
            protocol=(facts.protocol or "other")[:16],
            prompt_tokens=int(facts.prompt_tokens or 0),
            completion_tokens=int(facts.completion_tokens or 0),
            latency_ms=float(latency_ms),
            retrieval=bool(facts.snippets),
            status=status,
            chars=chars,
            lines=lines,
            first_line_chars=first,
        )
        with self._begin(conn) as c:
            rollup.execute(c, _INSERT_COMPLETION, row)  # parameters bound: one compiled statement for every row
            rollup.add_completion(c, row)
        return kind

    def record_event(
        self,
        user: str,
        type_: str,
        *,
        completion_id: object = None,
        choice_index: object = None,
        select_kind: object = None,
        protocol: str | None = "tabby",
        now: float | None = None,
        conn: sa.Connection | None = None,
    ) -> bool:
        """One editor event; False when it repeats one already stored (same completion and type, any choice)."""
        ts = time.time() if now is None else now
        t = type_ if type_ in EVENT_TYPES else "other"
        cid = completion_id_or_none(completion_id)
        idx = (
            choice_index
            if isinstance(choice_index, int) and not isinstance(choice_index, bool) and 0 <= choice_index < 1024
            else 0
        )
        kind = select_kind if t == "select" and isinstance(select_kind, str) and select_kind in SELECT_KINDS else None
        with self._begin(conn) as c:
            language, chars, lines, matched, full = UNKNOWN, 0, 0, False, (0, 0)
            if cid is not None:
                # a no-op write to the completion's row first: it takes the write lock (SQLite) or the
                # row's lock (PostgreSQL), so simultaneous events for one completion are checked one by one
                c.execute(
                    completions.update()
                    .where(completions.c.completion_id == cid, completions.c.user == user)
                    .values(completion_id=completions.c.completion_id)
                )
                if self._seen(c, cid, t, user):  # any choice index: this server's completions have one choice
                    return False
                row = c.execute(
                    sa.select(
                        completions.c.language,
                        completions.c.protocol,
                        completions.c.chars,
                        completions.c.lines,
                        completions.c.first_line_chars,
                    )
                    .where(completions.c.completion_id == cid, completions.c.user == user)
                    .limit(1)
                ).first()
                if row is not None:  # counted under the completion's language and protocol (OpenAI, Ollama, ...)
                    language, chars, lines, matched, protocol = row.language, row.chars, row.lines, True, row.protocol
                    full = (chars, lines)
                    if kind == "line":  # Tabby's select_kind=line: only the first line was taken
                        chars, lines = row.first_line_chars, min(lines, 1)
            row = dict(
                ts=ts,
                day=day_of(ts),
                user=user,
                type=t,
                select_kind=kind,
                completion_id=cid,
                choice_index=idx,
                protocol=(protocol or "other")[:16],
                matched=matched,
                language=language,
                chars=chars,
                lines=lines,
            )
            c.execute(events.insert().values(**row))
            rollup.add_event(c, row)
            if matched and t == "select" and not self._seen(c, cid, "view", user):
                # taken, so shown: without this view selects could outnumber views (acceptance past 100 %)
                shown = {**row, "type": "view", "select_kind": None, "chars": full[0], "lines": full[1]}
                c.execute(events.insert().values(**shown))
                rollup.add_event(c, shown)
        return True

    @staticmethod
    def _seen(c, cid: str, type_: str, user: str) -> bool:
        """Whether `user` reported an event of `type_` for completion `cid` (any choice index)."""
        q = sa.select(events.c.id).where(events.c.completion_id == cid, events.c.type == type_, events.c.user == user)
        return c.execute(q.limit(1)).first() is not None
