"""The real app (`create_app`) over the tiny random model, real accounts and audit log, for the
console tests; `signed_in(client, secret)` goes through the sign-in form as a browser would."""

from __future__ import annotations

import re

from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.db import open_db
from codemoat.engines.holder import LicenseStatus
from kept_holder import KeptHolder
from codemoat.serve.app import create_app


def make(url: str, engine, settings: Settings | None = None):
    accounts = Accounts(open_db(url))
    holder = KeptHolder("tiny")
    holder.set(engine)
    return create_app(settings or Settings(), holder=holder, accounts=accounts), accounts


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


def signed_in(client, secret: str):
    """Sign in through the form; returns the sign-in response (a 303 to /admin when it worked)."""
    form = client.get("/admin/signin")
    return client.post("/admin/signin", data={"csrf": csrf_of(form.text), "token": secret}, follow_redirects=False)


def leased(renewed_at: float, **kw) -> LicenseStatus:
    """What the license watch (engines/sealed.py) writes from LeaseKeeper.describe()."""
    base = dict(
        license_id="lic-1",
        customer="acme",
        license_mode="lease",
        license_expires="2027-01-01T00:00:00Z",
        license_expires_at=1798761600.0,
        features=["complete"],
        machine_id="m" * 16,
        model_file_id="f" * 16,
        format="gguf",
        non_dumpable=True,
        lease_state="held",
        lease_seconds_left=1500.0,
        lease_renewals=7,
        lease_renewed_at=renewed_at,
        lease_next_renewal_in=900.0,
        lease_failures=0,
        lease_key_server="keys.vendor.example:443",
        lease_grace=600.0,
    )
    return LicenseStatus(**{**base, **kw})
