"""Serves started together on one pending version each load it: one whose load fails (its own memory, a device)
after another serve's check passed the version leaves it current for the fleet (engines.loader.open_installed,
store.fail with only_pending) and serves the version kept before it, for itself only. Before, its failure rolled
the store back under the serve that served the version well. Real serves, a real store; the other serve's check
is its real effect on the store (store.confirm), made while this serve is held where it reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_s25_fleet import _health, _records, _start_held
from updhelp import create_token


def _torn(v: dict) -> None:
    moat = Path(v["dir"]) / "model.moat"
    data = bytearray(moat.read_bytes())
    data[len(data) // 2] ^= 1  # it no longer opens: here, a load that fails in this serve only
    moat.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_load_that_fails_here_keeps_a_version_another_serve_confirmed(shop, store, serve_process):
    lic = shop.license()
    v1 = store.apply(shop.release("1"), lic)
    store.confirm("model", v1["bundle_id"])
    admin = create_token("--name", "ops", "--scopes", "admin")

    # the negative: nobody else checked 2 meanwhile: the store goes back to 1, 2 recorded failed
    v2 = store.apply(shop.release("2"), lic)
    _torn(v2)
    srv, marker = _start_held(serve_process, "start_load")
    marker.unlink()
    srv.wait_ready()
    assert _health(srv.url, admin)["bundle"]["version"] == "1"
    assert store.current("model")["bundle_id"] == v1["bundle_id"] and [f["version"] for f in store.failed()] == ["2"]
    srv.stop()

    # the positive: another serve's check passed 3 while this one loaded it: 3 stays, this serve serves 1
    v3 = store.apply(shop.release("3"), lic)
    _torn(v3)
    srv, marker = _start_held(serve_process, "start_load")
    assert store.confirm("model", v3["bundle_id"])
    marker.unlink()
    srv.wait_ready()
    assert store.current("model")["bundle_id"] == v3["bundle_id"]
    assert [f["version"] for f in store.failed()] == ["2"]  # 3 is not recorded failed
    health = _health(srv.url, admin)
    assert health["status"] == "ok" and health["bundle"]["version"] == "1", health
    recs = _records()
    assert [d for s, d in recs if s == "update swapped" and d.get("version") == "1" and d.get("this_server_only")]
    assert "this server serves 1, kept before it, until it restarts" in srv.output()
