"""Review of f087a9c (stateless challenge nonces): a spent nonce's row and the key servers' clocks.

Was broken: a spent row was swept as soon as the sweeping process's wall clock passed the nonce's expiry, while
each process checks expiry on its own clock. A replica whose clock ran behind the sweeping one (another host,
or the same one after NTP stepped it back) then found no row and an unexpired nonce: the same signed request
was accepted twice (a replayed release frees a replica's seat). Spent rows now outlive their nonce by
`nonces.SKEW_S`. On SQLite and PostgreSQL (test_challenge_flood's fixtures).
"""

from __future__ import annotations

import time

import pytest

from codemoat.vault import nonces as nonces_mod
from codemoat.vault.clock import ManualClock
from codemoat.vault.keyserver import NONCE_TTL, REQUEST_DOMAIN, KeyServer, LeaseDenied

from . import test_challenge_flood as _flood

database_url, leased = _flood.database_url, _flood.leased  # its fixtures: SQLite and a real PostgreSQL


def _spent_then_swept_elsewhere(vendor, client, monkeypatch, ahead: float):
    """A request spent at key server B, then a sweep at key server A whose clock runs `ahead` seconds ahead."""
    t0 = time.time()
    b = KeyServer(vendor, ManualClock(t0))
    req = client._signed_request(b.challenge(client.lic.id, "c")["nonce"], REQUEST_DOMAIN)
    assert "lease" in b.lease(req)
    monkeypatch.setattr(nonces_mod, "SWEEP_EVERY", 1)  # sweep at A's next spend (one in 256 when serving)
    a = KeyServer(vendor, ManualClock(t0 + ahead))
    assert "lease" in a.lease(client._signed_request(a.challenge(client.lic.id, "c")["nonce"], REQUEST_DOMAIN))
    return req, t0


def test_a_replica_whose_clock_runs_behind_refuses_a_nonce_another_replica_swept(leased, monkeypatch):
    vendor, client = leased
    req, t0 = _spent_then_swept_elsewhere(vendor, client, monkeypatch, ahead=2 * NONCE_TTL)
    fresh_b = KeyServer(vendor, ManualClock(t0 + 1))  # B again, a new process: only the database can refuse it
    with pytest.raises(LeaseDenied) as e:
        fresh_b.lease(req)
    assert e.value.code == "bad_nonce"
    # the positive beside it: B still grants a genuine new request
    assert "lease" in fresh_b.lease(client._signed_request(fresh_b.challenge(client.lic.id, "c")["nonce"], REQUEST_DOMAIN))


def test_a_clock_stepped_back_on_one_key_server_does_not_revive_a_spent_nonce(leased, monkeypatch):
    vendor, client = leased
    clock = ManualClock()
    ks = KeyServer(vendor, clock)
    req = client._signed_request(ks.challenge(client.lic.id, "c")["nonce"], REQUEST_DOMAIN)
    assert "lease" in ks.lease(req)
    monkeypatch.setattr(nonces_mod, "SWEEP_EVERY", 1)
    clock.advance(NONCE_TTL + 5)  # the clock ran fast; the next spend sweeps
    assert "lease" in ks.lease(client._signed_request(ks.challenge(client.lic.id, "c")["nonce"], REQUEST_DOMAIN))
    clock.advance(-(NONCE_TTL + 5) + 1)  # NTP steps it back
    restarted = KeyServer(vendor, clock)  # its replay memory gone too
    with pytest.raises(LeaseDenied) as e:
        restarted.lease(req)
    assert e.value.code == "bad_nonce"


def test_spent_rows_are_still_swept_once_the_margin_has_passed(leased, monkeypatch):
    """The negative beside the margin: the table does not grow for ever, and a nonce swept after the margin is
    expired on every clock within it."""
    vendor, client = leased
    req, t0 = _spent_then_swept_elsewhere(vendor, client, monkeypatch, ahead=NONCE_TTL + nonces_mod.SKEW_S + 1)
    ks = KeyServer(vendor, ManualClock(t0 + NONCE_TTL + 1))  # any clock that has seen it expire
    assert ks.nonces.count() == 1  # only A's own spend is left
    with pytest.raises(LeaseDenied) as e:
        ks.lease(req)
    assert e.value.code == "bad_nonce"
