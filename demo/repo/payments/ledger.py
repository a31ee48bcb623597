"""An append-only ledger of charges."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Charge:
    order_id: str
    amount_minor: int
    fee_minor: int
    currency: str


@dataclass
class Ledger:
    charges: list[Charge] = field(default_factory=list)

    def record(self, charge: Charge) -> Charge:
        """Append a charge; the ledger never changes past entries."""
        self.charges.append(charge)
        return charge

    def net_minor(self) -> int:
        return sum(c.amount_minor - c.fee_minor for c in self.charges)
