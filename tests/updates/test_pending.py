"""A model version is pending until a serve's health check passed it once (updates.store.confirm): a
serve killed during the swap leaves `update apply` without an answer, which records the version failed
and puts the one before it back; a pending version found at serve's start (`update:model`: applied
while no serve ran, or both killed by a power cut) is checked before it serves, and rolled back when
the check fails. Real serves, real bundles; the serve is killed with SIGKILL at a point it reports
(store.hold: $CODEMOAT_HOME/run/held-swap-PID)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from codemoat.updates.store import HOLD_ENV
from updhelp import create_token, mute_gguf, one_line_error, run_cli, wait_unavailable


def _held(pid: int, timeout: float = 180) -> Path:
    """The marker serve `pid` creates once it is held mid-swap (polled, never slept on)."""
    marker = Path(os.environ["CODEMOAT_HOME"]) / "run" / f"held-swap-{pid}"
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert time.monotonic() < deadline, "the serve never reached the swap"
        time.sleep(0.05)
    return marker


def _apply(bundle: Path) -> subprocess.Popen:
    """`update apply BUNDLE` running beside the test (it blocks on the serve's answer)."""
    e = dict(os.environ)
    e.pop("CODEMOAT_DEBUG", None)
    cmd = [sys.executable, "-m", "codemoat.cli.main", "update", "apply", str(bundle)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _bundle_version(url: str, admin: str) -> str:
    return httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {admin}"}, timeout=60).json()["bundle"]["version"]


def _updates() -> list[tuple[str, str | None, str | None]]:
    """(route, version or failed version, via) of every `update` audit record."""
    recs = [json.loads(x) for x in run_cli("audit", "export", "--kind", "update").stdout.splitlines()]
    return [
        (r["route"], (r["detail"] or {}).get("version") or (r["detail"] or {}).get("failed"), (r["detail"] or {}).get("via"))
        for r in recs
    ]


def _completes(url: str, token: str, model: str = "tiny") -> httpx.Response:
    body = {"model": model, "prompt": "def f():", "max_tokens": 2}
    return httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {token}"}, json=body, timeout=60)


# -- the store -------------------------------------------------------------------------------------
def test_a_model_version_is_pending_until_a_serve_confirms_it(shop, store):
    lic = shop.license()
    v1 = store.apply(shop.release("1"), lic)
    assert store.pending("model", v1["bundle_id"])
    assert [(r["version"], r["current"], r.get("status")) for r in store.list()] == [("1", True, "pending")]
    assert store.confirm("model", v1["bundle_id"]) and not store.pending("model", v1["bundle_id"])
    assert not store.confirm("model", v1["bundle_id"])  # once: nothing more to record
    assert [(r["version"], r["current"], r.get("status")) for r in store.list()] == [("1", True, None)]
    assert ("confirmed", "1") in [(s, d.get("version")) for s, d in store.records]

    # a lost swap (only_pending) never undoes a version a serve's check passed ...
    assert store.fail("model", v1["bundle_id"], "server pid 1 ended during the swap", only_pending=True) is None
    assert store.current("model")["bundle_id"] == v1["bundle_id"]
    # ... and does undo one that none has checked
    v2 = store.apply(shop.release("2"), lic)
    assert not store.confirm("model", v1["bundle_id"])  # not current: nothing confirmed
    back = store.fail("model", v2["bundle_id"], "server pid 1 ended during the swap", only_pending=True)
    assert back == {"channel": "model", "failed": "2", "version": "1"}
    rows = store.list()
    assert [(r["version"], r["current"], r.get("status")) for r in rows] == [("1", True, None), ("2", False, "failed")]
    assert rows[1]["reason"] == "server pid 1 ended during the swap"


def test_a_state_written_before_pending_existed_counts_as_checked(shop, store):
    lic = shop.license()
    v1 = store.apply(shop.release("1"), lic)
    s = json.loads(store.state_path.read_text())
    del s["bundles"][v1["bundle_id"]]["pending"]  # as every store written before this change
    store.state_path.write_text(json.dumps(s))
    assert not store.pending("model", v1["bundle_id"])
    assert [r.get("status") for r in store.list()] == [None]
    assert store.fail("model", v1["bundle_id"], "lost", only_pending=True) is None


# -- real serves -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_serve_killed_mid_swap_is_rolled_back_and_restarts_on_the_version_before(shop, store, serve_process):
    lic = shop.license()
    store.apply(shop.release("1"), lic)  # no serve ran: pending, checked by the first start
    srv = serve_process(["--model", "update:model"], env={HOLD_ENV: "swap"})
    admin, user = create_token("--name", "ops", "--scopes", "admin"), create_token("--name", "dev")
    assert not store.pending("model", store.current("model")["bundle_id"])
    assert ("update confirmed", "1", "serve start") in _updates()

    apply = _apply(shop.release("2"))
    _held(srv.proc.pid)  # the serve took the swap: the store names 2, unchecked
    assert store.pending("model", store.current("model")["bundle_id"])
    _kill(srv.proc)  # kill -9 mid-swap (the OOM killer, a power cut of this process alone)
    out, err = apply.communicate(timeout=300)
    line = one_line_error(subprocess.CompletedProcess(apply.args, apply.returncode, out, err))
    assert f"installed model 2 (was 1); but server pid {srv.proc.pid} could not serve it" in line, line
    assert "ended during the swap" in line and "recorded as failed, the store is back on 1" in line, line
    assert store.current("model")["version"] == "1"
    (failed,) = store.failed()
    assert failed["version"] == "2" and failed["reason"] == f"server pid {srv.proc.pid} ended during the swap"
    assert ("update swap_rolled_back", "2", None) in _updates()

    srv = serve_process(["--model", "update:model"])  # systemd's restart
    assert _bundle_version(srv.url, admin) == "1" and _completes(srv.url, user).status_code == 200

    # a normal apply still swaps, and the serve's check confirms the version
    r = run_cli("update", "apply", str(shop.release("3")), "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    (a,) = json.loads(r.stdout)["served"]
    assert a["ok"] and a["swapped"] and a["pid"] == srv.proc.pid, a
    assert _bundle_version(srv.url, admin) == "3" and not store.pending("model", store.current("model")["bundle_id"])
    assert ("update confirmed", "3", "update apply") in _updates()


@pytest.mark.slow
def test_a_version_left_pending_by_a_power_cut_is_checked_at_start_before_it_serves(shop, store, serve_process):
    lic = shop.license()
    store.apply(shop.release("1"), lic)
    srv = serve_process(["--model", "update:model"], env={HOLD_ENV: "swap"})
    admin = create_token("--name", "ops", "--scopes", "admin")
    apply = _apply(shop.release("2"))
    _held(srv.proc.pid)
    _kill(apply)  # the power cut takes `update apply` too: nobody records anything
    _kill(srv.proc)
    assert store.pending("model", store.current("model")["bundle_id"])
    r = run_cli("update", "list", "--json")
    assert [(x["version"], x["current"], x.get("status")) for x in json.loads(r.stdout)] == [
        ("1", False, None),
        ("2", True, "pending"),
    ]

    srv = serve_process(["--model", "update:model"])
    assert _bundle_version(srv.url, admin) == "2"  # it passed its check at start, then served
    assert not store.pending("model", store.current("model")["bundle_id"])
    assert ("update confirmed", "2", "serve start") in _updates()


@pytest.mark.slow
def test_a_pending_version_that_fails_its_check_at_start_is_rolled_back_at_start(shop, store, serve_process, gguf_file, tmp_path):
    lic = shop.license()
    v1 = store.apply(shop.release("1"), lic)
    store.confirm("model", v1["bundle_id"])  # a serve checked 1 earlier
    store.apply(shop.release("2", source=mute_gguf(gguf_file, tmp_path / "mute.gguf")), lic)  # --no-swap, or no serve
    srv = serve_process(["--model", "update:model"])
    admin, user = create_token("--name", "ops", "--scopes", "admin"), create_token("--name", "dev")
    health = httpx.get(f"{srv.url}/health", headers={"Authorization": f"Bearer {admin}"}, timeout=60).json()
    assert health["bundle"]["version"] == "1", health  # served under the id of the model first loaded (a swap's rule)
    assert _completes(srv.url, user, health["model"]).status_code == 200
    assert store.current("model")["bundle_id"] == v1["bundle_id"]
    (failed,) = store.failed()
    assert failed["version"] == "2" and "health check at serve start failed" in failed["reason"], failed
    assert "produced no tokens" in failed["reason"]
    steps = _updates()
    for want in (("update swap_failed", "2"), ("update swap_rolled_back", "2"), ("update swapped", "1")):
        assert (*want, "serve start") in steps, steps
    assert "installed model 2 failed its health check at start" in srv.output()


@pytest.mark.slow
def test_a_pending_version_that_fails_to_load_at_start_is_rolled_back_at_start(shop, store, serve_process):
    lic = shop.license()
    v1 = store.apply(shop.release("1"), lic)
    store.confirm("model", v1["bundle_id"])
    v2 = store.apply(shop.release("2"), lic)
    moat = Path(v2["dir"]) / "model.moat"
    data = bytearray(moat.read_bytes())
    data[len(data) // 2] ^= 1  # a torn write, a bad disk: it no longer opens
    moat.write_bytes(bytes(data))
    srv = serve_process(["--model", "update:model"])
    admin = create_token("--name", "ops", "--scopes", "admin")
    assert _bundle_version(srv.url, admin) == "1"
    (failed,) = store.failed()
    assert failed["version"] == "2" and failed["reason"].startswith("it failed to load at serve start: "), failed
    steps = _updates()
    assert ("update swap_failed", "2", "serve start") in steps and ("update swap_rolled_back", "2", "serve start") in steps


@pytest.mark.slow
def test_a_first_version_that_fails_its_check_at_start_is_not_served(shop, store, serve_process, gguf_file, tmp_path):
    lic = shop.license()
    store.apply(shop.release("1", source=mute_gguf(gguf_file, tmp_path / "mute.gguf")), lic)
    srv = serve_process(["--model", "update:model"], wait=False)
    wait_unavailable(srv)  # it starts, and says it is not serving (no version passed), rather than serving 1
    user = create_token("--name", "dev")
    r = _completes(srv.url, user, "mute")  # the model's id is its file's name
    assert r.status_code == 503 and "failed its health check" in r.text, r.text
    assert store.current("model") is None and store.failed()[0]["version"] == "1"
    line = one_line_error(run_cli("update", "rollback"))
    assert "nothing to roll back" in line
