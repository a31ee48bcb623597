"""Card payments: amounts in minor units, interchange fees, a ledger of charges."""
