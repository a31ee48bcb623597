"""What a process holds open, read from /proc: a descriptor closed (or a process gone) while we look is skipped,
not an error (the clean-clone CI at ccbb0e4 failed once on such a race)."""

from __future__ import annotations

import os
from pathlib import Path


def fd_targets(pid: int | str = "self") -> list[str]:
    """What `pid`'s open descriptors point at (paths, 'socket:[N]', '/memfd:NAME (deleted)', ...)."""
    out = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return out
    for f in names:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{f}"))
        except FileNotFoundError:
            pass
    return out


def open_to(path: str | Path, pid: int | str = "self") -> int:
    """How many of `pid`'s descriptors are open on `path`."""
    return fd_targets(pid).count(str(path))
