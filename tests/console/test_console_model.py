"""The Model and license page and /health show the key lease's last renewal, next renewal, failed
attempts and key server (host:port only); a plaintext model shows none of it."""

from __future__ import annotations

import time

import pytest
from consoleapp import leased, signed_in
from fastapi.testclient import TestClient

from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.db import open_db
from codemoat.engines.holder import ModelHolder
from codemoat.serve.app import create_app


@pytest.fixture
def setup(home):
    accounts = Accounts(open_db(f"sqlite:///{home / 'codemoat.db'}"))
    holder = ModelHolder("sealed-model")  # no engine: the page and /health still show the license
    _, admin = accounts.create_token("root", user="root", scopes=("admin",))
    with TestClient(create_app(Settings(), holder=holder, accounts=accounts)) as c:
        yield c, holder, admin


def test_lease_renewal_on_the_model_page_and_in_health(setup):
    c, holder, admin = setup
    renewed = time.time() - 120
    holder.status.license = leased(renewed)
    assert signed_in(c, admin).status_code == 303
    page = c.get("/admin/model").text
    assert time.strftime("%Y-%m-%d %H:%M", time.gmtime(renewed)) + " UTC" in page
    assert "in 900 s" in page and "0 since the last renewal" in page and "keys.vendor.example:443" in page
    assert "2,100 s until the model is unloaded without a renewal (600 s of grace after expiry)" in page
    lic = c.get("/health", headers={"Authorization": f"Bearer {admin}"}).json()["license"]
    assert lic["lease_renewed_at"] == renewed and lic["lease_next_renewal_in"] == 900.0
    assert lic["lease_failures"] == 0 and lic["lease_key_server"] == "keys.vendor.example:443"

    holder.status.license = leased(renewed, lease_state="renewing", lease_next_renewal_in=-3.0, lease_failures=4)
    page = c.get("/admin/model").text
    assert "due now (retrying)" in page and "4 since the last renewal" in page


def test_no_lease_rows_for_an_offline_license_or_a_plaintext_model(setup):
    c, holder, admin = setup
    assert signed_in(c, admin).status_code == 303
    assert "last renewal" not in c.get("/admin/model").text  # plaintext: no license at all
    holder.status.license = leased(None, license_mode="offline", lease_state="offline", lease_key_server=None)
    page = c.get("/admin/model").text
    assert "last renewal" not in page and "key server" not in page
