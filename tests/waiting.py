"""`wait_for`: poll a condition until it holds or a deadline passes (for state another thread or process
changes: a lease lost, a background probe's finding). Every test folder can import it (`tests/` is on the path)."""

from __future__ import annotations

import time


def wait_for(cond, seconds: float = 10.0) -> bool:
    """Whether `cond()` became true within `seconds` (checked every 10 ms, and once more at the deadline)."""
    end = time.time() + seconds
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()
