"""Cloud price data: the dated file shipped with the package (`prices.toml`), or the customer's own copy."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import CodemoatError
from ..paths import read_regular

DEFAULT = Path(__file__).with_name("prices.toml")


@dataclass(frozen=True)
class PerToken:
    name: str
    input: float  # $ per 1M tokens
    cached_input: float
    output: float
    as_of: str
    source: str


@dataclass(frozen=True)
class PerSeat:
    name: str
    per_seat_month: float
    as_of: str
    source: str


def load_prices(path: Path | None = None) -> tuple[list[PerToken], list[PerSeat]]:
    """The per-token and per-seat alternatives; one-line errors for a file that is not one."""
    p = path or DEFAULT
    raw = read_regular(p, "price file", 16 << 20)  # a FIFO or /dev/zero is refused, not read for good
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CodemoatError(f"price file {p} is not valid TOML: {e}") from None
    # a misspelt table ([[per_tokens]]) or a file of something else compared against nothing, silently
    unknown = sorted(set(data) - {"per_token", "per_seat"})
    if unknown:
        raise CodemoatError(
            f"price file {p}: unknown {', '.join(map(repr, unknown))}: its entries are [[per_token]] and [[per_seat]] tables"
        )
    if not all(isinstance(data.get(k, []), list) for k in ("per_token", "per_seat")):
        raise CodemoatError(f"price file {p}: write each alternative as a [[per_token]] or [[per_seat]] table (double brackets)")
    if not data.get("per_token") and not data.get("per_seat"):
        raise CodemoatError(
            f"price file {p} lists no alternative: add [[per_token]] or [[per_seat]] entries (see {DEFAULT.name})"
        )
    try:
        tok = [
            PerToken(
                str(x["name"]),
                _price(x["input"]),
                _price(x.get("cached_input", x["input"])),
                _price(x["output"]),
                str(x["as_of"]),
                str(x["source"]),
            )
            for x in data.get("per_token", [])
        ]
        seat = [
            PerSeat(str(x["name"]), _price(x["per_seat_month"]), str(x["as_of"]), str(x["source"]))
            for x in data.get("per_seat", [])
        ]
    except (KeyError, TypeError) as e:
        raise CodemoatError(f"price file {p}: an entry lacks {e} (each needs name, prices, as_of and source)") from None
    return tok, seat


def _price(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != v or v == float("inf"):
        raise CodemoatError(f"a price must be a number ≥ 0, not {v!r}")
    return float(v)
