"""When an engine process owes answers and gives none: is it working on them, or hung?

An engine process can stop without dying: its reader stuck (then the server's frames wait in the socket
and nothing comes back), its worker deadlocked, the process stopped. No send stalls when the server sends
nothing more, so only the silence shows it. Silence alone is no proof: a long prompt's prefill sends no
message for as long as it takes (minutes, for a large model on CPU), and a request queued behind others
waits silently while they are answered.

So progress is either a message from the process (any request's token, error or slot change) or work:
time its threads spend runnable (running, or waiting for a core: `/proc/PID/task/*/schedstat`), or disk
reads (major page faults: the first prefill of a model mapped from a slow disk waits on them, asleep).
A prefill computes, a hung process sleeps. CPU time alone would not tell them apart on a loaded machine:
an engine process starved of cores computes for a few milliseconds in seconds, but it waits to run all
that time. `AnswerWatch.check` (called about once a second while some request owes an answer) says the
process is hung once it sent nothing, was runnable for less than `MIN_RUNNABLE_S` and faulted no page in
from disk in `limit` seconds (`model.answer_timeout_s`).

Work alone is no proof either: an engine can spin in a loop producing nothing (a batcher that never steps,
a decode that never returns). So a batching engine process also counts its steps (`llama_decode` calls) in
a `StepCell`, an 8-byte memfd the server reads: no message and no step while answers are owed, and one of
its threads ran on a core for `spin_limit` seconds meanwhile (`model.spin_timeout_s`), is a spinning engine.
Time on a core, not time waiting for one: an engine starved of cores on a loaded machine steps late but is
not spinning.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from collections.abc import Callable

#: seconds a silent engine process's threads must be runnable in a `limit`-long window to count as working
#: (a prefill's thread is runnable all the window; a hung process's threads sleep, a few microseconds aside)
MIN_RUNNABLE_S = 0.05
#: seconds between two checks that mean nothing was owed in between (checks come once a second while owed)
GAP_S = 3.0


def work(pid: int) -> tuple[dict[int, int], int] | None:
    """Process `pid`'s work so far: per thread, nanoseconds it ran or waited for a core (`ran` below: only those
    it ran); and its major page faults (pages read in from disk). None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    faults = int(stat[stat.rindex(b")") + 2 :].split()[9])  # majflt: field 12 of stat(5)
    return {tid: run + wait for tid, (run, wait) in _schedstats(pid, tids).items()}, faults


def ran(pid: int) -> dict[int, int]:
    """Per thread of process `pid`, nanoseconds it ran on a core (not those it waited for one)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    return {tid: run for tid, (run, _) in _schedstats(pid, tids).items()}


def _schedstats(pid: int, tids: list[str]) -> dict[int, tuple[int, int]]:
    out = {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                run, wait = f.read().split()[:2]
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        out[int(tid)] = (int(run), int(wait))
    return out


class StepCell:
    """A step counter the engine process writes (`set`, on the thread that steps) and the server reads
    (`value`): 8 bytes of a memfd mapped in both (no message, no system call a step). The server makes it,
    hands `fd` to the process it starts, then closes `fd` (`drop_fd`); the mapping lives with this object."""

    def __init__(self, fd: int | None = None):
        self.fd: int | None = os.memfd_create("codemoat-steps", os.MFD_CLOEXEC) if fd is None else fd
        os.ftruncate(self.fd, 8)
        self._map = mmap.mmap(self.fd, 8)
        self._cell = ctypes.c_uint64.from_buffer(self._map)

    @property
    def value(self) -> int:
        return self._cell.value

    def set(self, n: int) -> None:
        self._cell.value = n

    def drop_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class AnswerWatch:
    """`check()` is None while process `pid` makes progress, else why it is hung. `received()` counts the
    process's messages so far; `steps()`, when given, its steps (`StepCell`), which `spin_limit` watches."""

    def __init__(
        self,
        pid: int,
        limit: float,
        received: Callable[[], int],
        steps: Callable[[], int] | None = None,
        spin_limit: float = 0.0,
    ):
        self.pid, self.limit, self.received = pid, limit, received
        self.steps, self.spin_limit = steps, spin_limit if steps is not None else 0.0
        self._seen: tuple[int, int] | None = None
        self._since = self._quiet = self._last = 0.0
        self._work: tuple[dict[int, int], int] | None = None
        self._ran: dict[int, int] | None = None  # threads' time on a core at the quiet window's first check

    def check(self) -> str | None:
        """Called about once a second while an answer is owed; a longer gap means none was owed meanwhile."""
        if not self.limit and not self.spin_limit:
            return None
        now = time.monotonic()
        seen = (self.received(), self.steps() if self.steps is not None else 0)
        last, self._last = self._last, now
        if seen != self._seen or now - last > GAP_S:  # a message or a step, or a new wait: a new window
            self._seen, self._since, self._quiet, self._work, self._ran = seen, now, now, None, None
            return None
        if self.spin_limit:
            if self._ran is None:
                self._ran = ran(self.pid)
            elif now - self._quiet >= self.spin_limit:  # spinning: a thread of it ran that long since, on a core
                on_core = max((ns - self._ran.get(tid, 0) for tid, ns in ran(self.pid).items()), default=0) / 1e9
                if on_core >= self.spin_limit:
                    return (
                        f"the engine process sent nothing and made no step for {now - self._quiet:.0f} s while requests "
                        f"waited, though a thread of it ran for {on_core:.0f} s"
                    )
        if not self.limit:
            return None
        if self._work is None:  # silent since the last check: its work counts from here (read only now, not each second)
            self._work = work(self.pid)
            return None
        if now - self._since < self.limit:
            return None
        done = work(self.pid)
        if done is None:
            return None  # it ended: its supervisor hears of that anyway
        spent = sum(ns - self._work[0].get(tid, 0) for tid, ns in done[0].items())
        if spent >= MIN_RUNNABLE_S * 1e9 or done[1] > self._work[1]:  # computing, waiting for a core or a disk: a new window
            self._since, self._work = now, done
            return None
        return f"the engine process sent nothing for {now - self._since:.0f} s while requests waited, and did no work"
