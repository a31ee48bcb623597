"""The cost case: codemoat on the customer's hardware against per-token and per-seat clouds (`model.py`)."""

import math
from typing import Any

from ..errors import CodemoatError

from .measure import DEFAULT_SOURCES, measured
from .model import Inputs, Option, Result, compute
from .prices import PerSeat, PerToken, load_prices

__all__ = ["DEFAULT_SOURCES", "Inputs", "Option", "PerSeat", "PerToken", "Result", "compute", "load_prices", "measured"]


def case(overrides: dict | None = None, *, engine=None, prices=None) -> Result:
    """Inputs = defaults, then what this server measured (with `engine`), then `overrides` (entered); computed."""
    values: dict = {}
    sources = dict(DEFAULT_SOURCES)
    if engine is not None:
        for k, (v, why) in measured(engine).items():
            values[k], sources[k] = v, why
    for k, v in (overrides or {}).items():
        values[k], sources[k] = v, "entered"
    tok, seat = load_prices(prices)
    inputs = Inputs(**values, sources=sources)
    try:
        r = compute(inputs, tok, seat)
        _finite(r.to_dict())
    except (ArithmeticError, ValueError):  # each input in range, their arithmetic not: 1e-320 GPUs a server
        raise CodemoatError(
            "these inputs overflow the model's arithmetic (a value too close to 0, or amounts past a float's range)"
        ) from None
    return r


def _finite(v: Any) -> None:
    """OverflowError for an infinite or NaN amount in a computed case: inputs each in range multiply past a float's
    range without an exception (1e-290 tokens a second, $1e12 a server), and math.floor/ceil of one raise only there
    (`codemoat tco` printed "error: OverflowError: ...", and the console's chart of an infinity was a 500)."""
    if isinstance(v, float) and not math.isfinite(v):
        raise OverflowError("an amount past a float's range")
    for x in v.values() if isinstance(v, dict) else v if isinstance(v, list) else ():
        _finite(x)
