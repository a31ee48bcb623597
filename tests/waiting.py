"""`wait_for`: poll a condition until it holds or a deadline passes (for state another thread or process
changes: a lease lost, a background probe's finding). Every test folder can import it (`tests/` is on the path)."""

from __future__ import annotations

import subprocess
import time


def stop_process(p: subprocess.Popen, seconds: float = 60) -> None:
    """End a server a test started: SIGTERM (its graceful shutdown), then SIGKILL if it is not gone in `seconds`."""
    p.terminate()
    try:
        p.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=seconds)


def wait_for(cond, seconds: float = 30.0) -> bool:
    """Whether `cond()` became true within `seconds` (checked every 10 ms, and once more at the deadline).
    The default is generous: it only bounds a failure, and a loaded 2-core CI can starve a thread for seconds."""
    end = time.time() + seconds
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def _syscall(native_id: int) -> str | None:
    """The number of the system call thread `native_id` of this process is blocked in, or None (running, gone)."""
    try:
        with open(f"/proc/self/task/{native_id}/syscall") as f:
            first = f.read().split(" ", 1)[0].strip()
    except OSError:
        return None
    return first if first.isdigit() else None


_ACCEPT: list[str] = []


def blocked_in_accept(thread) -> bool:
    """Whether `thread` is blocked in accept() now: its system call is the one a thread of ours blocked in
    accept() shows (so the check needs no table of system call numbers)."""
    if not _ACCEPT:
        import socket
        import threading

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind("")  # an abstract address: nothing on disk
            s.listen(1)
            t = threading.Thread(target=lambda: _swallow(s), daemon=True)
            t.start()
            seen: list[str | None] = []  # the same call over 20 looks 10 ms apart: in accept, not passing by
            wait_for(lambda: seen.append(_syscall(t.native_id)) or (len(set(seen[-20:])) == 1 and len(seen) >= 20), 30)
            _ACCEPT.append(seen[-1] or "")
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(s.getsockname())
            t.join(30)
    return _syscall(thread.native_id) == _ACCEPT[0]


def _swallow(s) -> None:
    s.accept()[0].close()
