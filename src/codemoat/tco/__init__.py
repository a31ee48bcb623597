"""The cost case: codemoat on the customer's hardware against per-token and per-seat clouds (`model.py`)."""

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
    return compute(Inputs(**values, sources=sources), tok, seat)
