"""A vendor's licenses: issuing one for a customer's sealed model (signed by `vault.license_issue`, each TPM machine's
binding checked by `vault.tpmbind`, recorded in the vendor database), revoking one (its leases end with it), and
listing them with their state and live leases. A mixin of `Vendor` (`vault.vendor`), which holds the keys and
the customers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..durations import LATEST
from ..errors import CodemoatError, NotFound
from .codec import VaultError
from .license_issue import issue as issue_license_doc
from .vendor_tables import customers_t, leases_t, licenses_t, models_t


class VendorLicenses:
    """The licensing half of `Vendor`."""

    # and from `Vendor`: open_sealed, find_customer
    engine: sa.Engine
    signing_key: Ed25519PrivateKey
    keyserver_key_b64: str

    def issue_license(
        self,
        *,
        customer: str,
        model: str | Path,
        machines: list[dict[str, Any]],
        expires: int,
        not_before: int | None = None,
        features: list[str] | None = None,
        mode: str = "offline",
        keyserver: str | None = None,
        lease_ttl: int = 3600,
        grace: int = 900,
        seats: int = 1,
        max_seats_per_machine: int | None = None,
        watermark: bool = True,
        policy: str = "most",
        support_until: int | None = None,
        allow_no_facts: bool = False,
    ) -> dict[str, Any]:
        """Sign a license for `customer`'s sealed `model` on `machines`, record it, and return the document.
        `allow_no_facts`: a machine whose identity holds no hardware facts may be licensed (`machine.check_facts`)."""
        sealed, key = self.open_sealed(model)
        cust = self.find_customer(customer)
        if cust is None:
            raise NotFound(f"no customer named {customer!r} (customers are created by `vendor seal`)")
        if sealed.manifest.customer_id != cust.id:
            raise VaultError(f"{Path(model).name} is sealed for customer {sealed.manifest.customer!r}, not {customer!r}")
        now = int(time.time())
        nb = now if not_before is None else not_before
        for what, t in (("expiry", expires), ("not-before date", nb), ("support date", support_until or 0)):
            if not 0 <= t <= LATEST:
                raise CodemoatError(f"license {what} {t} is outside the years 1970-9999")
        lease = None
        if mode == "lease":
            if not keyserver:
                raise CodemoatError("a lease license needs --keyserver URL")
            if lease_ttl < 2 or grace < 0 or seats < 1:
                raise CodemoatError("lease TTL must be at least 2 s, grace at least 0 s, seats at least 1")
            lease = {
                "url": keyserver.rstrip("/"),
                "server_key": self.keyserver_key_b64,
                "ttl": lease_ttl,
                "grace": max(grace, 1),
                "seats": seats,
            }
            if max_seats_per_machine is not None:  # signed in the license: the key server enforces it
                if not 1 <= max_seats_per_machine <= seats:
                    raise CodemoatError(f"--max-seats-per-machine must be from 1 to the license's {seats} seats")
                lease["max_seats_per_machine"] = max_seats_per_machine
        doc = issue_license_doc(
            self.signing_key,
            sealed=sealed,
            customer=cust.name,
            customer_id=cust.id,
            machines=machines,
            content_key=key,
            watermark_key=cust.watermark_secret if watermark else None,
            not_before=nb,
            expires=expires,
            issued_at=now,
            features=features or ["complete", "chat", "index"],
            mode=mode,
            policy=policy,
            lease=lease,
            support_until=support_until,
            allow_no_facts=allow_no_facts,
        )
        from .tpmbind import require_bound

        for m in doc["license"]["machines"]:  # a TPM's AK must have been proven to live beside its certified EK
            require_bound(self.engine, m)
        body = doc["license"]
        with self.engine.begin() as c:
            c.execute(
                licenses_t.insert().values(
                    id=body["id"],
                    customer_id=cust.id,
                    file_id=sealed.manifest.file_id,
                    mode=mode,
                    seats=seats if mode == "lease" else 1,
                    issued_at=now,
                    not_before=nb,
                    expires=expires,
                    lease_ttl=lease_ttl if mode == "lease" else None,
                    grace=(lease or {}).get("grace"),
                    revoked_at=None,
                    lease_gen=0,
                    document=json.dumps(doc),
                )
            )
        return doc

    def revoke(self, license_id: str) -> None:
        with self.engine.begin() as c:
            n = c.execute(licenses_t.update().where(licenses_t.c.id == license_id).values(revoked_at=int(time.time()))).rowcount
            c.execute(leases_t.delete().where(leases_t.c.license_id == license_id))
        if not n:
            raise NotFound(f"no license {license_id}")

    def license_row(self, license_id: str) -> Any:
        with self.engine.connect() as c:
            return c.execute(sa.select(licenses_t).where(licenses_t.c.id == license_id)).first()

    def licenses(self) -> list[dict[str, Any]]:
        """Every license with its customer, model, dates, state and live leases."""
        now = time.time()
        with self.engine.connect() as c:
            rows = c.execute(
                sa.select(licenses_t, customers_t.c.name.label("customer"), models_t.c.model_id)
                .join(customers_t, customers_t.c.id == licenses_t.c.customer_id)
                .join(models_t, models_t.c.file_id == licenses_t.c.file_id)
                .order_by(licenses_t.c.issued_at)
            ).all()
            live = dict(
                c.execute(
                    sa.select(leases_t.c.license_id, sa.func.count())
                    .where(leases_t.c.expires > now)
                    .group_by(leases_t.c.license_id)
                ).all()
            )
        out = []
        for r in rows:
            state = "revoked" if r.revoked_at else "expired" if r.expires <= now else "active"
            out.append(
                {
                    "id": r.id,
                    "customer": r.customer,
                    "model": r.model_id,
                    "file_id": r.file_id,
                    "mode": r.mode,
                    "seats": r.seats,
                    "leases": live.get(r.id, 0),
                    "issued_at": r.issued_at,
                    "not_before": r.not_before,
                    "expires": r.expires,
                    "revoked_at": r.revoked_at,
                    "state": state,
                }
            )
        return out
