"""Interchange and scheme fees charged by card networks, per brand and region."""

from __future__ import annotations

# Basis points (1/100 of a percent) of the amount, then a fixed part in minor units.
INTERCHANGE_BPS = {("visa", "eea"): 30, ("mastercard", "eea"): 30, ("visa", "us"): 180, ("amex", "us"): 250}
FIXED_FEE_MINOR = {"eea": 5, "us": 10}


def interchange_fee(amount_minor: int, card_brand: str, region: str) -> int:
    """The interchange fee in minor units for a charge of `amount_minor` on `card_brand` in `region`."""
    bps = INTERCHANGE_BPS.get((card_brand, region), 200)
    return (amount_minor * bps + 9_999) // 10_000 + FIXED_FEE_MINOR.get(region, 15)


def is_regulated(region: str) -> bool:
    """The EU's Interchange Fee Regulation caps consumer card fees in the EEA."""
    return region == "eea"
