"""Parsing durations (`90s`, `15m`, `12h`, `30d`) and dates for CLI options."""

from __future__ import annotations

import datetime as dt
import re

from ..errors import CodemoatError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in `text` such as `90s`, `15m`, `12h`, `30d`, `2w` (a bare number is seconds)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text or "")
    if not m:
        raise CodemoatError(f"invalid duration {text!r}: use e.g. 90s, 15m, 12h, 30d")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_when(text: str) -> float:
    """Epoch seconds of an ISO date/time (UTC unless given) or of now + a duration."""
    try:
        d = dt.datetime.fromisoformat(text)
    except ValueError:
        import time

        return time.time() + parse_duration(text)
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.timezone.utc)
    return d.timestamp()
