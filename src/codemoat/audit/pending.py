"""A record on its way to a group commit (`AuditLog._flush`), and what can keep it out: errors of the
record's own values (`RecordRefused`, written alone) against errors of the write (the log unavailable)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from .heads import AuditUnavailable


def psycopg_error() -> type[BaseException]:
    import psycopg

    return psycopg.Error


def psycopg_data_error() -> type[BaseException]:
    import psycopg

    return psycopg.DataError


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class Pending:
    """One record waiting for a group commit, and what became of it."""

    __slots__ = ("row", "seq", "error", "done", "also", "then", "fut")

    def __init__(self, row: dict[str, Any], also: Callable[[sa.Connection], Any] | None = None):
        self.row, self.seq, self.error, self.done, self.also = row, 0, None, False, also
        self.then: Callable[[], Any] | None = None  # `append_async`: run by the writer once the record is written
        self.fut: asyncio.Future | None = None  # `append_async`: the waiting loop's future


class AlsoFailed(Exception):
    """What a record's `also` raised, inside the transaction it shares with the records."""


class RecordRefused(AuditUnavailable):
    """The database refused a record's values (PostgreSQL's data errors: an integer out of range, a NUL;
    SQLite's overflow), not the write: the log is still writable, and the records of other requests
    group-committed with it are written alone (`AuditLog._flush`)."""


#: what a record's own values raise on SQLite (the driver's, or the hash's: sqlite3 raises OverflowError
#: for an integer past 64 bits before SQLAlchemy sees it)
SQLITE_REFUSALS = (OverflowError, ValueError, sa.exc.DataError, sa.exc.InterfaceError)
