"""Zero-downtime swap: a running `codemoat serve` switches to an applied model bundle under load."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from updhelp import Streams, create_token
from vault.conftest import KeyServerProcess

pytestmark = pytest.mark.slow


def test_swap_under_16_streaming_clients_drops_nothing(shop, store, serve_process):
    lic = shop.license()
    srv = serve_process(["--model", str(shop.moat), "--license", str(lic)])
    user, admin = create_token("--name", "dev"), create_token("--name", "ops", "--scopes", "admin")
    before = httpx.get(f"{srv.url}/health", headers={"Authorization": f"Bearer {admin}"}).json()
    store.apply(shop.release("2"), lic)
    body = {"model": before["model"], "prompt": "def fibonacci(n):\n", "max_tokens": 12, "temperature": 0.0}
    with Streams(srv.url, user, body, clients=16) as streams:
        time.sleep(3)
        r = httpx.post(f"{srv.url}/admin/api/model/swap", headers={"Authorization": f"Bearer {admin}"}, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["version"] == "2"
        swapped_at = time.monotonic()
        time.sleep(3)
        new_served = streams.served_after(swapped_at)  # requests were served by the new engine too
    assert streams.stats["failed"] == 0, streams.stats["errors"][:3]
    assert new_served  # requests were served by the new model too
    after = httpx.get(f"{srv.url}/health", headers={"Authorization": f"Bearer {admin}"}).json()
    assert after["license"]["license_id"] != before["license"]["license_id"]  # v2 came with its own license
    assert after["status"] == "ok"


def test_failed_swap_keeps_the_old_model_serving(shop, store, serve_process, tmp_path):
    lic = shop.license()
    srv = serve_process(["--model", str(shop.moat), "--license", str(lic)])
    user, admin = create_token("--name", "dev"), create_token("--name", "ops", "--scopes", "admin")
    h = {"Authorization": f"Bearer {admin}"}
    r = httpx.post(f"{srv.url}/admin/api/model/swap", headers=h, timeout=60)
    assert r.status_code >= 400 and "no model bundle is installed" in r.text
    broken = tmp_path / "broken.moat"
    data = bytearray(shop.moat.read_bytes())
    data[len(data) // 2] ^= 1
    broken.write_bytes(bytes(data))
    r = httpx.post(f"{srv.url}/admin/api/model/swap", headers=h, json={"model": str(broken), "license": str(lic)}, timeout=120)
    assert r.status_code >= 400, r.text
    r = httpx.post(
        f"{srv.url}/v1/completions",
        headers={"Authorization": f"Bearer {user}"},
        json={"model": "tiny", "prompt": "def f():", "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 200, r.text  # the old model never stopped
    r = httpx.post(f"{srv.url}/admin/api/model/swap", headers={"Authorization": f"Bearer {user}"}, timeout=60)
    assert r.status_code == 403  # not an admin


def _completes(url: str, token: str) -> int:
    body = {"model": "tiny", "prompt": "def f():", "max_tokens": 2}
    return httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {token}"}, json=body, timeout=60).status_code


def test_lease_licensed_model_swaps_once_its_new_lease_holds(shop, store, vendor, serve_process):
    """The swap takes the new model's lease first (no lease: no switch, the old model serves on); after
    it, the new license's lease governs what is served and the old license's lease is given back."""
    ks = KeyServerProcess(vendor).start()
    try:
        lic = shop.license(mode="lease", keyserver=ks.url, lease_ttl=4, grace=1)
        srv = serve_process(["--model", str(shop.moat), "--license", str(lic)])
        user, admin = create_token("--name", "dev"), create_token("--name", "ops", "--scopes", "admin")
        h = {"Authorization": f"Bearer {admin}"}
        before = httpx.get(f"{srv.url}/health", headers=h).json()["license"]
        assert before["license_mode"] == "lease"

        v2 = store.apply(shop.release("2"), lic)
        vendor.revoke(json.loads((Path(v2["dir"]) / "model.lic").read_text())["license"]["id"])
        r = httpx.post(f"{srv.url}/admin/api/model/swap", headers=h, timeout=120)
        assert r.status_code >= 400 and "revoked" in r.text, r.text  # no lease for v2: nothing switched
        assert _completes(srv.url, user) == 200

        v3 = store.apply(shop.release("3"), lic)
        r = httpx.post(f"{srv.url}/admin/api/model/swap", headers=h, timeout=120)
        assert r.status_code == 200 and r.json()["version"] == "3", r.text
        after = httpx.get(f"{srv.url}/health", headers=h).json()["license"]
        new_id = json.loads((Path(v3["dir"]) / "model.lic").read_text())["license"]["id"]
        assert after["license_id"] == new_id and after["license_mode"] == "lease" and after["lease_state"] == "held"

        vendor.revoke(before["license_id"])  # the old license no longer matters: its watch was stopped
        time.sleep(5)  # more than a renewal period (TTL 4 s x 0.5) and the old lease's TTL + grace
        assert _completes(srv.url, user) == 200
        vendor.revoke(new_id)  # the new one does: its lease keeper unloads the served model
        deadline = time.time() + 20
        while _completes(srv.url, user) == 200:
            assert time.time() < deadline, "the swapped-in model kept serving after its license was revoked"
            time.sleep(0.2)
    finally:
        ks.stop()
