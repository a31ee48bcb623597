"""Durations (`90s`, `15m`, `12h`, `30d`) and dates as people type them: CLI options, `--since`.

Every time parsed here must print as a date again, so nothing reaches past the end of the year
9999 (UTC): `LATEST`, which the vault also holds license times to."""

from __future__ import annotations

import datetime as dt
import re

from .errors import CodemoatError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")
#: 9999-12-31T23:59:59Z, the last second a four-digit year can name
LATEST = 253402300799


def parse_duration(text: str) -> float:
    """Seconds in `text` such as `90s`, `15m`, `12h`, `30d`, `2w` (a bare number is seconds)."""
    m = _DURATION.fullmatch(text or "")
    if not m:
        raise CodemoatError(f"invalid duration {text!r}: use e.g. 90s, 15m, 12h, 30d")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds > LATEST:  # also catches inf: no duration here reaches past year 9999
        raise CodemoatError(f"duration {text!r} is too long")
    return seconds


def parse_when(text: str) -> float:
    """Epoch seconds of an ISO date/time (UTC unless given) or of now + a duration."""
    try:
        d = dt.datetime.fromisoformat(text)
    except ValueError:
        import time

        if re.match(r"\s*\d{4}-", text or ""):  # meant as a date, e.g. 2027-13-45
            raise CodemoatError(f"invalid date {text!r}: use an ISO date such as 2027-12-31 or 2027-12-31T18:00") from None
        if not _DURATION.fullmatch(text or ""):
            raise CodemoatError(
                f"invalid duration or date {text!r}: use e.g. 30d, 12h or an ISO date such as 2027-12-31"
            ) from None
        t = time.time() + parse_duration(text)
        if t > LATEST:
            raise CodemoatError(f"{text!r} from now is past the year 9999")
        return t
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    if d.timestamp() > LATEST:  # 9999-12-31T23:00-05:00 is in the year 10000 in UTC
        raise CodemoatError(f"date {text!r} is past the year 9999")
    return d.timestamp()


def parse_ago(text: str) -> float:
    """Epoch seconds of an ISO date/time (UTC unless given) or of now minus a duration (`--since 7d`)."""
    import time

    if _DURATION.fullmatch(text or ""):
        return time.time() - parse_duration(text)
    return parse_when(text)


def show_time(t: float | int, fmt: str = "%Y-%m-%dT%H:%M:%SZ") -> str:
    """A Unix time as a UTC date; one no calendar date can hold (a damaged or hostile stored field)
    is shown as the number it is, so listing or describing never fails on it."""
    try:
        return dt.datetime.fromtimestamp(t, dt.UTC).strftime(fmt)
    except (OverflowError, OSError, ValueError):
        return f"@{t} (out of range)"
