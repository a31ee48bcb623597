"""Money amounts as integers of the currency's minor unit (cents), never floats."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

# ISO 4217 exponents: how many decimal places each currency's minor unit has.
CURRENCY_EXPONENTS = {"EUR": 2, "USD": 2, "GBP": 2, "JPY": 0, "KWD": 3}


class UnknownCurrency(ValueError):
    """The currency code is not one this service settles in."""


def to_minor_units(amount: Decimal, currency: str) -> int:
    """Convert a decimal amount to an integer count of the currency's minor units (banker's rounding)."""
    try:
        exponent = CURRENCY_EXPONENTS[currency]
    except KeyError:
        raise UnknownCurrency(currency) from None
    scaled = (amount * (10**exponent)).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
    return int(scaled)


def format_minor_units(minor: int, currency: str) -> str:
    """`1234, "EUR"` -> `"12.34 EUR"`."""
    exponent = CURRENCY_EXPONENTS[currency]
    if exponent == 0:
        return f"{minor} {currency}"
    return f"{minor // 10**exponent}.{minor % 10**exponent:0{exponent}d} {currency}"
