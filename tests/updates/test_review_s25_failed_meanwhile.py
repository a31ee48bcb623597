"""A swap that passes in a serve after the store recorded its version failed meanwhile (serve.swapping).

`update apply` gives up on a serve whose swap stage lasted STALL_S (a multi-GB load from a slow disk is one
stage) and records the version lost: failed, the store back on the version before, the failed bundle's files
tidied away. The serve's load goes on with the files it opened; its check passes, `store.confirm` finds the
version no longer current, and the serve served on what `update list` names failed, its files gone, until it
restarted: nothing hands it the store's version again (`_settle` re-hands only serves that answered). Now it
goes back to the store's version itself.

Real serve, real bundles, a real `update apply` hand-off and its `_lost_swaps`; the serve is held (store.hold)
after its swap passed and before it confirms, as a slow load is still running when apply gives up on it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from codemoat.updates.handoff import STALL_ENV
from codemoat.updates.store import HOLD_ENV
from updhelp import create_token


def _marker(pid: int) -> Path:
    return Path(os.environ["CODEMOAT_HOME"]) / "run" / f"held-confirm-{pid}"


def _released_while(thread: threading.Thread, pid: int, proc) -> None:
    """Let serve `pid` go on from every hold at `confirm` until `thread` (its hand-off) is done."""
    while thread.is_alive():
        assert proc.poll() is None, "the serve ended"
        _marker(pid).unlink(missing_ok=True)
        time.sleep(0.05)


def _hand_over_in_thread(channel: str, **kw) -> tuple[threading.Thread, list]:
    from codemoat.updates.handoff import hand_over

    got: list = []
    t = threading.Thread(target=lambda: got.append(hand_over(channel, **kw)), daemon=True)
    t.start()
    return t, got


def _health(url: str, admin: str) -> dict:
    return httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {admin}"}, timeout=60).json()


@pytest.mark.slow
def test_a_version_recorded_failed_while_its_swap_ran_is_not_served_on(shop, store, serve_process):
    from codemoat.cli.updates_cmd import _lost_swaps
    from codemoat.updates.handoff import hand_over

    lic = shop.license()
    v1 = store.apply(shop.release("1"), lic)
    store.confirm("model", v1["bundle_id"])
    admin = create_token("--name", "ops", "--scopes", "admin")
    srv = serve_process(["--model", "update:model"], env={HOLD_ENV: "confirm", STALL_ENV: "1"})
    pid = srv.proc.pid

    # the negative: nothing changed the store while the swap of 2 ran: it is confirmed and served
    v2 = store.apply(shop.release("2"), lic)
    t, got = _hand_over_in_thread("model")
    _released_while(t, pid, srv.proc)
    (a,) = got[0]
    assert a["ok"] and a["swapped"] and a["version"] == "2", a
    assert not store.pending("model", v2["bundle_id"])
    assert _health(srv.url, admin)["bundle"]["version"] == "2"

    # the positive: apply gives up on the swap of 3 (its stage outlasted the stall bound) and records it failed,
    # the store back on 2, while the serve's swap goes on and passes
    v3 = store.apply(shop.release("3"), lic)
    (a,) = hand_over("model", silence=10, timeout=120)
    assert a["ok"] is False and a["lost"] and a["silent"], a
    (a,) = _lost_swaps(store, "model", v3["bundle_id"], [a])
    assert "the store is back on 2" in a["error"], a
    assert v3["bundle_id"] not in store.state()["bundles"]  # its files tidied away
    # the serve's hand-off is over once another one gets its turn (an adapter nobody installed: refused at once)
    t, got = _hand_over_in_thread("adapter:nothing")
    _released_while(t, pid, srv.proc)
    assert "no adapter bundle named 'nothing'" in got[0][0]["error"], got
    health = _health(srv.url, admin)
    assert health["status"] == "ok" and health["bundle"]["version"] == "2", health  # not 3, recorded failed
    assert store.current("model")["bundle_id"] == v2["bundle_id"]
    assert "3 passed here but was recorded failed meanwhile" in srv.output()
    user = create_token("--name", "dev")
    body = {"model": health["model"], "prompt": "def add(a, b):\n    return", "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {user}"}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


def _held_at(name: str, srv) -> Path:
    marker = Path(os.environ["CODEMOAT_HOME"]) / "run" / f"held-{name}-{srv.proc.pid}"
    while not marker.exists():
        assert srv.proc.poll() is None, srv.output()
        time.sleep(0.05)
    return marker


@pytest.mark.slow
def test_a_start_whose_version_another_serve_failed_meanwhile_serves_the_stores_version(shop, store, serve_process):
    """Serves started together on one pending version: another serve's check failed it (recorded failed, files
    tidied) while this one was still loading it. This serve found it no longer pending and served it unchecked."""
    lic = shop.license()
    v1 = store.apply(shop.release("1"), lic)
    store.confirm("model", v1["bundle_id"])
    admin = create_token("--name", "ops", "--scopes", "admin")

    # the negative: nobody else failed 2 while this serve loaded it: its check passes, it is confirmed and served
    v2 = store.apply(shop.release("2"), lic)
    srv = serve_process(["--model", "update:model"], env={HOLD_ENV: "start_loaded"}, wait=False)
    _held_at("start_loaded", srv).unlink()
    srv.wait_ready()
    assert _health(srv.url, admin)["bundle"]["version"] == "2"
    assert not store.pending("model", v2["bundle_id"])
    srv.stop()

    # the positive: the serve beside it failed 3 (as its check at start records it) once this one had loaded it
    v3 = store.apply(shop.release("3"), lic)
    srv = serve_process(["--model", "update:model"], env={HOLD_ENV: "start_loaded"}, wait=False)
    marker = _held_at("start_loaded", srv)
    back = store.fail("model", v3["bundle_id"], "its health check at serve start failed: out of memory", only_pending=True)
    assert back["version"] == "2"
    marker.unlink()
    srv.wait_ready()
    health = _health(srv.url, admin)
    assert health["status"] == "ok" and health["bundle"]["version"] == "2", health  # not 3, recorded failed
    assert store.current("model")["bundle_id"] == v2["bundle_id"]
    assert "installed model 3 was recorded failed while this server loaded it" in srv.output()
