"""An audit record's fields as callers hand them in (`normalise`) and as people read them (`to_public`)."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Any

from ..errors import CodemoatError
from .chain import FIELDS

#: every kind of record the server writes
KINDS = (
    "request",
    "unauthenticated",
    "alert",
    "egress_blocked",
    "rotation",
    "engine_crashed",
    "directory",
    "update",
    "tamper",
    "tpm_checkpoint",
    "withheld",
)


def check_kind(kind: str | None) -> str | None:
    """`kind` if it is one the log holds (or None); an unknown one is a one-line error, not an
    empty answer."""
    if kind is not None and kind not in KINDS:
        raise CodemoatError(f"unknown record kind {kind!r}: use one of {', '.join(KINDS)}")
    return kind


_INTS = ("prompt_tokens", "completion_tokens", "status")
_TEXTS = ("kind", "user", "token_id", "route", "protocol", "model", "client", "prompt_text", "completion_text")
# The columns' lengths (migrations/b001_audit.py): PostgreSQL refuses a longer value, or a NUL in any
# text, and would fail the whole group-committed batch; SQLite takes both. Coerced the same on both
# backends (before the hash), so a caller's model name or prompt cannot make an append fail.
_LIMITS = {"kind": 32, "user": 128, "token_id": 64, "route": 256, "protocol": 32, "model": 256, "client": 128}


#: a lone UTF-16 surrogate: Python lets one into a str (a file name that is not UTF-8, read with
#: surrogateescape; JSON's "\\ud800"), but no encoder takes it: in a record it failed the append (and
#: its group-committed batch) or, escaped in a detail, every page and answer that showed the record
_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(k: str, v: Any) -> str:
    t = _SURROGATE.sub("\ufffd", str(v).replace("\x00", "\ufffd"))
    n = _LIMITS.get(k)
    return t if n is None or len(t) <= n else t[: n - 1] + "\u2026"


def normalise(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Coerce values to what the database gives back, so hashes recompute exactly after a round trip."""
    unknown = set(fields) - set(FIELDS) - {"ts"}
    if unknown:
        raise ValueError(f"unknown audit fields: {sorted(unknown)}")
    row: dict[str, Any] = {k: None for k in FIELDS}
    row["kind"] = kind
    ts = fields.get("ts")
    row["ts_us"] = int((time.time() if ts is None else float(ts)) * 1_000_000)
    for k in _TEXTS:
        if fields.get(k) is not None:
            row[k] = _text(k, fields[k])
    for k in _INTS:
        if fields.get(k) is not None:
            row[k] = int(fields[k])
    if fields.get("latency_ms") is not None:
        row["latency_ms"] = round(float(fields["latency_ms"]), 3)
    for k in ("repos", "snippets"):
        if fields.get(k):
            row[k] = json.dumps([str(x) for x in fields[k]], separators=(",", ":"))
    if fields.get("detail"):
        row["detail"] = _detail(fields["detail"])
    return row


def _detail(detail: Any) -> str:
    """`detail` as stored: ASCII JSON, lone surrogates replaced by U+FFFD (a real pair, an emoji, stays)."""
    text = json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)
    if "\\ud" in text:  # an escaped surrogate, paired or lone: only a lone one is replaced
        raw = json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
        text = json.dumps(json.loads(_SURROGATE.sub("\ufffd", raw)), sort_keys=True, separators=(",", ":"))
    return text


def to_public(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as people and exports see it: ISO time, lists and dicts decoded."""
    out = dict(row)
    out["time"] = iso_time(row["ts_us"], "microseconds") or "?"
    for k in ("repos", "snippets"):
        out[k] = _stored_json(row[k], json.loads) if row.get(k) else []
    out["detail"] = _stored_json(row["detail"], _public_detail) if row.get("detail") else {}
    return {"seq": out.pop("seq"), "time": out.pop("time"), **out}


def iso_time(ts_us: Any, timespec: str = "seconds") -> str | None:
    """A record's `ts_us` as ISO 8601 UTC; None when it is not a time (a value someone wrote into the database:
    text, a year past 9999). Such a record fails `verify`; reading and exporting the log still go on past it."""
    if type(ts_us) is not int:
        return None
    try:
        return datetime.fromtimestamp(ts_us / 1_000_000, tz=UTC).isoformat(timespec=timespec)
    except (ValueError, OverflowError, OSError):
        return None


def _stored_json(stored: Any, decode: Any) -> Any:
    """A stored JSON column decoded, or as stored when it is not JSON (an edited record is shown, not a crash)."""
    try:
        return decode(stored)
    except (TypeError, ValueError, RecursionError):
        return stored


def _public_detail(stored: str) -> Any:
    """A stored detail decoded; one written before lone surrogates were replaced (`_detail`) is shown
    with U+FFFD in their place, as it would be stored now."""
    detail = json.loads(stored)
    if "\\ud" in stored:
        detail = json.loads(_SURROGATE.sub("\ufffd", json.dumps(detail, ensure_ascii=False)))
    return detail


def parse_since(text: str | None) -> float | None:
    """`--since` as epoch seconds: an ISO date/time, or a duration back from now (90s, 15m, 2h, 7d, 2w)."""
    if not text:
        return None
    from ..durations import parse_ago

    try:  # refuses what reaches past year 9999 (as a count of microseconds it would not fit SQLite)
        return parse_ago(text.strip())
    except CodemoatError as e:
        raise CodemoatError(f"cannot use --since {text!r}: {e}") from None
