"""One engine process (`engines.child`): started, its model loaded, sent frames, stopped or killed.

`spawn` starts it over a Unix socket pair, sends the spec (engine class, model path, options), and waits
for "ready" with the loaded model's facts; `Child` holds the process, its socket and the `Inbox` that reads
it. What to do when it dies, and its requests, are the supervisor's (`engines.supervised`).
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from ..errors import CodemoatError
from .base import Engine
from .child import Frames, frame
from .inbox import Inbox
from .memfd import MemfdBuffer
from .watchdog import StepCell

log = logging.getLogger("codemoat.engines")


def describe_exit(code: int) -> str:
    """The signal's name (SIGSEGV) for a death by signal, else "exit status N"."""
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


class Child:
    """One engine process, its socket, and the `Inbox` that reads it (which closes the socket at its end)."""

    def __init__(
        self, proc: subprocess.Popen, sock: socket.socket, facts: dict[str, Any], frames: Frames, steps: StepCell | None = None
    ):
        self.proc, self.sock, self.facts, self.frames = proc, sock, facts, frames
        self.steps = steps if facts.get("counts_steps") else None  # its decode steps (`watchdog.StepCell`): batching only
        self.started = time.monotonic()
        self.inbox: Inbox | None = None
        self.hung: str | None = None  # why the server found it hung and killed it

    def send(self, msg: Any) -> None:
        """Never waits on the process (`Inbox.send`); OSError once it is gone or hung."""
        if self.inbox is None:
            self.sock.sendall(frame(msg))
            return
        self.inbox.send(frame(msg))

    def kill_hung(self, why: str) -> None:
        """It stopped reading or answering: kill it; its end is a crash like any other (`SupervisedEngine._ended`)."""
        if self.hung is None:
            self.hung = why
            log.error("engine process %d: %s; killing it", self.proc.pid, why)
            self.proc.kill()

    def stop(self, timeout: float = 10.0) -> None:
        try:
            self.send(("stop",))
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.inbox is None:
            self.sock.close()


class Died(Exception):
    def __init__(self, code: int):
        self.code = code
        super().__init__(describe_exit(code))


def spawn(engine_cls: type[Engine], path: str, opts: dict[str, Any], buf: MemfdBuffer | None) -> Child:
    """Start an engine process of `engine_cls` on `path` (a sealed model's memfd `buf` inherited) and wait
    until its model is loaded: `Died` if it died meanwhile, one `CodemoatError` line if it could not load."""
    ours, theirs = socket.socketpair()
    steps = StepCell()
    fds = [theirs.fileno(), steps.fd] + ([buf.fd] if buf is not None else [])
    # sealed adapters' memfds (engines.adapters), opened as /proc/self/fd/N in the child too
    fds += [int(p.rsplit("/", 1)[1]) for p in (opts.get("adapters") or {}).values()]
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "codemoat.engines.child", str(theirs.fileno())],
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            process_group=0,  # not the terminal's (Ctrl-C is the server's to handle); the same session, so the same scheduling group
        )
    finally:
        theirs.close()
        steps_fd = steps.fd
        steps.drop_fd()
    frames = Frames(ours)
    spec = {
        "engine": f"{engine_cls.__module__}:{engine_cls.__qualname__}",
        "path": path,
        "opts": opts,
        "steps_fd": steps_fd,
        "log_level": logging.getLogger("codemoat").getEffectiveLevel(),
    }
    try:
        ours.sendall(frame(spec))
        got = frames.batch()
        msg = got[0] if got else None
    except OSError:
        msg = None
    if msg is None or msg[0] != "ready":
        code = proc.wait()
        ours.close()
        if msg is not None and msg[0] == "error":
            raise CodemoatError(msg[1])
        raise Died(code)
    return Child(proc, ours, msg[1], frames, steps)
