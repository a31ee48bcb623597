"""A pending model version that kills the serve process while it loads (out of memory, a native crash;
kill -9 from the test stands in for the OOM killer) is not loaded again by every restart: each start
counts its try before loading it (updates.store.start_attempt, `update.start_attempts`), and the start
after the last try records it failed without loading it and serves the version before. A version that
passes its check is confirmed and its count is gone. Real serves, real bundles; the serve is killed at
the point it reports (store.hold: $CODEMOAT_HOME/run/held-start-PID), polled, never slept on."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from codemoat.updates.store import HOLD_ENV
from updhelp import create_token, run_cli

TRIES = {"CODEMOAT_UPDATE__START_ATTEMPTS": "2"}


def _entry(store, version: str) -> dict:
    s = store.state()
    return next(info for info in s["bundles"].values() if info["version"] == version)


def _killed_while_loading(serve_process) -> None:
    """A serve start held where it loads the current version (its try counted), then killed with SIGKILL."""
    srv = serve_process(["--model", "update:model"], env={HOLD_ENV: "start", **TRIES}, wait=False)
    marker = Path(os.environ["CODEMOAT_HOME"]) / "run" / f"held-start-{srv.proc.pid}"
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert srv.proc.poll() is None and time.monotonic() < deadline, srv.output()
        time.sleep(0.05)
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(timeout=60)


def _updates() -> list[tuple[str, str | None, str | None]]:
    recs = [json.loads(x) for x in run_cli("audit", "export", "--kind", "update").stdout.splitlines()]
    return [
        (r["route"], (r["detail"] or {}).get("version") or (r["detail"] or {}).get("failed"), (r["detail"] or {}).get("via"))
        for r in recs
    ]


def _version(url: str, admin: str) -> str:
    return httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {admin}"}, timeout=60).json()["bundle"]["version"]


# -- the store -------------------------------------------------------------------------------------
def test_a_pending_version_is_counted_before_each_start_and_failed_unloaded_past_the_limit(shop, store):
    lic = shop.license()
    v1 = store.apply(shop.release("1"), lic)
    assert store.start_attempt("model", 2) == [] and _entry(store, "1")["start_attempts"] == 1
    assert store.confirm("model", v1["bundle_id"])
    assert "start_attempts" not in _entry(store, "1")  # a checked version has no count
    assert store.start_attempt("model", 2) == [] and "start_attempts" not in _entry(store, "1")  # nor gets one

    v2 = store.apply(shop.release("2"), lic)
    assert store.start_attempt("model", 2) == [] and store.start_attempt("model", 2) == []
    assert _entry(store, "2")["start_attempts"] == 2 and store.pending("model", v2["bundle_id"])
    (gone,) = store.start_attempt("model", 2)  # the third start: failed without a load, 1 serves
    assert gone["version"] == "2" and "tried at 2 starts" in gone["reason"], gone
    assert store.current("model")["bundle_id"] == v1["bundle_id"]
    (failed,) = store.failed()
    assert failed["version"] == "2" and failed["reason"] == gone["reason"]
    steps = [(s, d.get("version") or d.get("failed")) for s, d in store.records]
    assert ("swap_failed", "2") in steps and ("swap_rolled_back", "2") in steps
    assert not (Path(v2["dir"])).exists()  # its files go with it


def test_a_damaged_count_is_a_first_try_not_a_traceback_and_old_states_have_none(shop, store):
    lic = shop.license()
    store.apply(shop.release("1"), lic)
    s = json.loads(store.state_path.read_text())
    (info,) = s["bundles"].values()
    info["start_attempts"] = "lots"  # hand-edited; and a state written before counts has no key at all
    store.state_path.write_text(json.dumps(s))
    assert store.start_attempt("model", 1) == [] and _entry(store, "1")["start_attempts"] == 1
    (gone,) = store.start_attempt("model", 1)
    assert gone["version"] == "1" and store.current("model") is None


# -- real serves -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_pending_version_that_kills_its_serve_while_loading_is_rolled_back_after_the_limit(shop, store, serve_process):
    lic = shop.license()
    store.apply(shop.release("1"), lic)  # no serve ran: pending
    srv = serve_process(["--model", "update:model"], env=TRIES)  # passes on its first start
    admin, user = create_token("--name", "ops", "--scopes", "admin"), create_token("--name", "dev")
    assert _version(srv.url, admin) == "1"
    assert not store.pending("model", store.current("model")["bundle_id"])
    assert "start_attempts" not in _entry(store, "1")  # confirmed: its count is gone
    srv.stop()

    v2 = store.apply(shop.release("2"), lic)  # --no-swap, or no serve: pending
    for n in (1, 2):  # systemd's restarts: the OOM killer takes each one while it loads 2
        _killed_while_loading(serve_process)
        assert _entry(store, "2")["start_attempts"] == n and store.pending("model", v2["bundle_id"])

    srv = serve_process(["--model", "update:model"], env=TRIES)  # the start after the last try
    assert _version(srv.url, admin) == "1"
    body = {"model": "tiny", "prompt": "def f():", "max_tokens": 2}
    r = httpx.post(f"{srv.url}/v1/completions", headers={"Authorization": f"Bearer {user}"}, json=body, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None, r.text
    (failed,) = store.failed()
    assert failed["version"] == "2" and "tried at 2 starts" in failed["reason"], failed
    steps = _updates()
    assert ("update swap_failed", "2", "serve start") in steps and ("update swap_rolled_back", "2", "serve start") in steps
    assert "installed model 2: it was tried at 2 starts" in srv.output()
    r = run_cli("update", "list", "--json")
    assert [(x["version"], x["current"], x.get("status")) for x in json.loads(r.stdout)] == [
        ("1", True, None),
        ("2", False, "failed"),
    ]


@pytest.mark.slow
def test_a_pending_version_killed_once_then_passing_is_confirmed(shop, store, serve_process):
    lic = shop.license()
    v1 = store.apply(shop.release("1"), lic)
    _killed_while_loading(serve_process)
    assert _entry(store, "1")["start_attempts"] == 1
    srv = serve_process(["--model", "update:model"], env=TRIES)
    admin = create_token("--name", "ops", "--scopes", "admin")
    assert _version(srv.url, admin) == "1" and not store.pending("model", v1["bundle_id"])
    assert "start_attempts" not in _entry(store, "1") and store.failed() == []
    assert ("update confirmed", "1", "serve start") in _updates()
