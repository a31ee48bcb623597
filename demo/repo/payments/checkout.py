"""Charging an order: convert its total, work out the network's fee, record the charge."""

from __future__ import annotations

from decimal import Decimal

from .fees import interchange_fee
from .ledger import Charge, Ledger
from .money import to_minor_units


def charge_order(ledger: Ledger, order_id: str, total: Decimal, currency: str, card_brand: str, region: str) -> Charge:
    """Charge an order's total to a card and record it in the ledger."""
    amount_minor = to_minor_units(total, currency)
    fee_minor = interchange_fee(amount_minor, card_brand, region)
    return ledger.record(Charge(order_id, amount_minor, fee_minor, currency))
