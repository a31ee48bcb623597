"""A whole outbound exchange bounded by one deadline, not per read.

httpx's `timeout` bounds each connect, read and write, never the answer: a server (or a proxy, the
customer's own) that sends a byte every few seconds holds the caller for good. `within` runs the
exchange in a daemon thread and gives up on it after `limit` seconds; the abandoned thread is told
so through `cancel` (a loop that reads a body checks it) and otherwise ends with its connection.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import TypeVar

T = TypeVar("T")

#: a whole answer may take this many of a client's (per-read) timeouts
ANSWER_TIMEOUTS = 6


class DeadlinePassed(TimeoutError):
    """The exchange sent no complete answer in time (it goes on in its thread, abandoned)."""


def settle(future: Future, fn: Callable[[], object]) -> None:
    """fn()'s result or exception into `future` (a thread's target: nothing escapes it)."""
    try:
        future.set_result(fn())
    except BaseException as e:  # noqa: BLE001 - handed to the waiter, which raises it
        future.set_exception(e)


def within(limit: float, fn: Callable[[], T], what: str, cancel: threading.Event | None = None) -> T:
    """fn()'s result (or its exception), or `DeadlinePassed` naming `what` once `limit` seconds pass."""
    done: Future[T] = Future()
    threading.Thread(target=settle, args=(done, fn), name="codemoat-deadline", daemon=True).start()
    if not wait([done], timeout=limit).done:
        if cancel is not None:
            cancel.set()
        raise DeadlinePassed(f"{what} sent no complete answer in {limit:g} s")
    return done.result()
