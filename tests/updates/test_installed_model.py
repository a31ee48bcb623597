"""`serve --model update:model` serves the model bundle `update apply` installed, whatever version is
current at each start; `update rollback` hands the version it goes back to to the running serve, as
`apply` does."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from updhelp import create_token, one_line_error, run_cli


def _license_ids(store) -> dict[str, str]:
    """{version: the license id its bundle carries} of the installed model versions."""
    return {
        r["version"]: json.loads(Path(r["license"]).read_text())["license"]["id"]
        for r in store.list()
        if r["channel"] == "model" and "license" in r
    }


def _served_license(url: str, admin: str) -> str:
    return httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {admin}"}).json()["license"]["license_id"]


def _served_bundle(url: str, admin: str, store) -> str:
    """The installed bundle's version /health names (and that it is the store's current model bundle)."""
    b = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {admin}"}).json()["bundle"]
    assert b["bundle_id"] == store.current("model")["bundle_id"], b
    return b["version"]


def test_update_model_without_an_installed_bundle_is_one_line(shop, home):
    line = one_line_error(run_cli("serve", "--model", "update:model", "--port", "0"))
    assert "no model bundle is installed" in line, line
    shop.license()
    line = one_line_error(run_cli("serve", "--model", "update:model", "--license", str(shop.license()), "--port", "0"))
    assert "leave out --license" in line, line


@pytest.mark.slow
def test_serve_update_model_follows_apply_rollback_and_restart(shop, store, serve_process):
    lic = shop.license()
    store.apply(shop.release("1"), lic)
    srv = serve_process(["--model", "update:model"])
    admin = create_token("--name", "ops", "--scopes", "admin")
    ids = _license_ids(store)
    assert _served_license(srv.url, admin) == ids["1"]  # v1's own license, from the store
    assert _served_bundle(srv.url, admin, store) == "1"  # and /health names the installed version

    r = run_cli("update", "apply", str(shop.release("2")), "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    (a,) = json.loads(r.stdout)["served"]
    assert a["ok"] and a["swapped"] and a["pid"] == srv.proc.pid
    ids = _license_ids(store)
    assert _served_license(srv.url, admin) == ids["2"]
    assert _served_bundle(srv.url, admin, store) == "2"

    # rollback hands v1 back to the running serve (it only edited the store before)
    r = run_cli("update", "rollback", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "model: 2 -> 1" in r.stdout and f"server pid {srv.proc.pid} serves it now" in r.stdout, r.stdout
    assert _served_license(srv.url, admin) == ids["1"]
    assert _served_bundle(srv.url, admin, store) == "1"
    recs = [json.loads(x) for x in run_cli("audit", "export", "--kind", "update").stdout.splitlines()]
    assert ("update swapped", "1") in [(x["route"], (x["detail"] or {}).get("version")) for x in recs]

    # a restart after an apply made while no serve ran serves the installed version, not the old file
    srv.stop()
    time.sleep(0.5)
    r = run_cli("update", "apply", str(shop.release("3")))
    assert r.returncode == 0 and "it serves from the next start" in r.stdout, r.stdout
    srv = serve_process(["--model", "update:model"])
    assert _served_license(srv.url, admin) == _license_ids(store)["3"]
    assert _served_bundle(srv.url, admin, store) == "3"
    assert not any(p.name.endswith(".partial") for p in Path(os.environ["CODEMOAT_HOME"]).rglob("*"))
