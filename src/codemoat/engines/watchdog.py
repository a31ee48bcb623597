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

An engine in the server's own process (`model.isolation = inline`) is watched the same way by `InlineWatch`,
with its worker thread for the process: its schedstat and page faults (`/proc/self/task/TID/`), its steps,
and the requests it finished for the messages. A thread cannot be killed, so a stalled inline engine is
reported instead (`WorkerEngine.stall`): its requests and new ones get `Stalled` (503 with Retry-After), its
state is "stalled" (`/health` 503), an `engine_crashed` incident is audited (`hung`, `why`, `isolation`), and
with `model.exit_on_hang` the server stops (SIGTERM to itself: requests in flight drain, the audit log
closes) and exits with `EXIT_STALLED`, for its service manager to restart it. Without it, the stall clears
once the worker takes a job again (a probe queued behind what it was stuck on).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..errors import Overloaded

log = logging.getLogger("codemoat.engines")

#: seconds a silent engine process's threads must be runnable in a `limit`-long window to count as working
#: (a prefill's thread is runnable all the window; a hung process's threads sleep, a few microseconds aside)
MIN_RUNNABLE_S = 0.05
#: seconds between two checks that mean nothing was owed in between (checks come once a second while owed)
GAP_S = 3.0
#: seconds between two looks of `InlineWatch` (`AnswerWatch.check` expects about one a second)
TICK_S = 1.0
#: the exit status of a server stopped by a stalled inline engine (`model.exit_on_hang`): EX_SOFTWARE, a
#: failure, so that a service manager restarting on failure (systemd's Restart=on-failure) restarts it
EXIT_STALLED = 70
#: seconds a server stopping after a stall has to drain its requests and close its audit log before it
#: exits regardless (uvicorn gives requests 10 s)
EXIT_GRACE_S = 60.0


class Stalled(Overloaded):
    """A request on an inline engine that stopped making progress: 503 in each protocol's shape, with
    Retry-After (an `Overloaded`, as the other replicas or the restarted server can answer it)."""

    code = "model_unavailable"

    def __init__(self, message: str, retry_after: float = 5.0):
        super().__init__(message)
        self.retry_after = retry_after


def work(pid: int, tid: int | None = None) -> tuple[dict[int, int], int] | None:
    """Process `pid`'s work so far (or only its thread `tid`'s): per thread, nanoseconds it ran or waited for a
    core (`ran` below: only those it ran); and its major page faults (pages read in from disk). None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            stat = f.read()
        tids = os.listdir(f"/proc/{pid}/task") if tid is None else [str(tid)]
    except OSError:
        return None
    faults = int(stat[stat.rindex(b")") + 2 :].split()[9])  # majflt: field 12 of stat(5)
    return {tid: run + wait for tid, (run, wait) in _schedstats(pid, tids).items()}, faults


def ran(pid: int, tid: int | None = None) -> dict[int, int]:
    """Per thread of process `pid` (or only `tid`), nanoseconds it ran on a core (not those it waited for one)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task") if tid is None else [str(tid)]
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


class Working:
    """`working()`: whether process `pid` ran, waited for a core or read pages from disk for `MIN_RUNNABLE_S` or
    more since the last call (the first call only takes the mark). A process that takes no frame of its socket
    while this holds is in a long step, not hung (`inbox.Inbox`)."""

    def __init__(self, pid: int):
        self.pid = pid
        self._mark: tuple[int, int] | None = None

    def __call__(self) -> bool:
        w = work(self.pid)
        if w is None:
            return False
        now = (sum(w[0].values()), w[1])
        before, self._mark = self._mark, now
        return before is not None and (now[0] - before[0] >= MIN_RUNNABLE_S * 1e9 or now[1] > before[1])

    def reset(self) -> None:
        """Forget the mark: the next call only takes one (a new wait, not compared with an old one)."""
        self._mark = None


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
    process's messages so far; `steps()`, when given, its steps (`StepCell`), which `spin_limit` watches.
    With `tid`, only that thread of `pid` is watched (an inline engine's worker: `InlineWatch`)."""

    def __init__(
        self,
        pid: int,
        limit: float,
        received: Callable[[], int],
        steps: Callable[[], int] | None = None,
        spin_limit: float = 0.0,
        tid: int | None = None,
    ):
        self.pid, self.limit, self.received, self.tid = pid, limit, received, tid
        self.who, self.runner = ("the engine process", "a thread of it") if tid is None else ("the inline engine", "its thread")
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
                self._ran = ran(self.pid, self.tid)
            elif now - self._quiet >= self.spin_limit:  # spinning: a thread of it ran that long since, on a core
                on_core = max((ns - self._ran.get(tid, 0) for tid, ns in ran(self.pid, self.tid).items()), default=0) / 1e9
                if on_core >= self.spin_limit:
                    return (
                        f"{self.who} sent nothing and made no step for {now - self._quiet:.0f} s while requests "
                        f"waited, though {self.runner} ran for {on_core:.0f} s"
                    )
        if not self.limit:
            return None
        if self._work is None:  # silent since the last check: its work counts from here (read only now, not each second)
            self._work = work(self.pid, self.tid)
            return None
        if now - self._since < self.limit:
            return None
        done = work(self.pid, self.tid)
        if done is None:
            return None  # it ended: its supervisor hears of that anyway
        spent = sum(ns - self._work[0].get(tid, 0) for tid, ns in done[0].items())
        if spent >= MIN_RUNNABLE_S * 1e9 or done[1] > self._work[1]:  # computing, waiting for a core or a disk: a new window
            self._since, self._work = now, done
            return None
        return f"{self.who} sent nothing for {now - self._since:.0f} s while requests waited, and did no work"


class InlineWatch:
    """The watchdogs of a `WorkerEngine` in the server's own process (see the module docstring): a thread that
    looks about once a second while the engine owes answers (`AnswerWatch` over its worker thread) and, when it
    stalls, has the engine say so (`WorkerEngine.stall`), then stops the server (`exit_on_hang`) or waits for
    the worker to take a job again (`WorkerEngine.unstall`). `stop()` ends it (the engine's close)."""

    def __init__(self, engine: Any, answer_timeout_s: float, spin_timeout_s: float, exit_on_hang: bool):
        self.engine, self.exit_on_hang = engine, exit_on_hang
        self.answer_timeout_s, self.spin_timeout_s = answer_timeout_s, spin_timeout_s
        self.watch = AnswerWatch(
            os.getpid(), answer_timeout_s, lambda: engine.answered, engine.step_counter(), spin_timeout_s, tid=engine.worker_tid
        )
        self._probe: Future | None = None  # a job queued on the stalled worker: done once it works again
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-watchdog", daemon=True)
        self._thread.start()

    def facts(self) -> dict[str, Any]:
        return {
            "answer_timeout_s": self.answer_timeout_s,
            "spin_timeout_s": self.spin_timeout_s,
            "exit_on_hang": self.exit_on_hang,
        }

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(TICK_S):
            try:
                self._look()
            except Exception:  # said, and it looks again next second: a watchdog that died would watch nothing
                log.exception("the inline engine's watchdog failed")

    def _look(self) -> None:
        eng = self.engine
        if eng.stalled is not None:
            if self._probe is not None and self._probe.done():  # its worker took a job again: the stall is over
                self._probe = None
                eng.unstall()
            return
        if not eng.owed():
            return
        why = self.watch.check()
        if why is None:
            return
        eng.stall(why, EXIT_STALLED if self.exit_on_hang else None)
        if self.exit_on_hang:
            exit_server(why)
        else:
            self._probe = eng.probe()


def exit_server(why: str) -> None:
    """Stop this server as SIGTERM does (requests in flight drain, the audit log closes; `codemoat serve` then
    exits with `EXIT_STALLED`: `ModelHolder.exit_status`), and exit regardless after `EXIT_GRACE_S`."""

    def last_resort() -> None:
        time.sleep(EXIT_GRACE_S)
        log.error("the server did not stop within %.0f s of its engine's stall: exiting now", EXIT_GRACE_S)
        os._exit(EXIT_STALLED)

    log.error("stopping the server (exit status %d) for its service manager to start it again: %s", EXIT_STALLED, why)
    threading.Thread(target=last_resort, name="engine-stalled-exit", daemon=True).start()
    os.kill(os.getpid(), signal.SIGTERM)
