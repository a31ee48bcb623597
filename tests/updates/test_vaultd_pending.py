"""Under vaultd a pending model version (no health check passed it yet) never serves unchecked: vaultd's
serves run elsewhere, without the update store, so vaultd checks the version itself before it offers it
(updates.vaultcheck: the engine a serve would build, in a child process, on the fixed prompt), at its start
with `--model update:model` and when `update apply` hands a version over. Passed, the version is
confirmed in vaultd's store; failed, it is recorded failed, the store goes back to the version before it
and the serves never see it. Real vaultd, real serves, real bundles."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from test_vaultd_model_swap import InstalledVaultd, _bundle, _complete, _serve_vault, _wait_bundle
from updhelp import mute_gguf, one_line_error, run_cli


def _mute(gguf_file: Path, tmp_path: Path) -> Path:
    """The test model with a zero output layer (loads, answers no token), under the same name: the same model id."""
    (tmp_path / "mute").mkdir(exist_ok=True)
    return mute_gguf(gguf_file, tmp_path / "mute" / gguf_file.name)


def _updates() -> list[tuple[str, str | None, str | None]]:
    """(route, version or failed version, via) of every `update` audit record in this (vaultd's) home."""
    recs = [json.loads(x) for x in run_cli("audit", "export", "--kind", "update").stdout.splitlines()]
    return [
        (r["route"], (r["detail"] or {}).get("version") or (r["detail"] or {}).get("failed"), (r["detail"] or {}).get("via"))
        for r in recs
    ]


def _statuses(store) -> list[tuple[str, bool, str | None]]:
    return [(r["version"], r["current"], r.get("status")) for r in store.list()]


@pytest.mark.slow
def test_vaultd_checks_a_pending_version_at_its_start_and_offers_the_one_before_when_it_fails(
    shop, store, serve_process, gguf_file, tmp_path
):
    lic = shop.license()
    store.apply(shop.release("1"), lic)  # pending: vaultd's start checks it, and it passes
    with InstalledVaultd(tmp_path / "v.sock") as vaultd:
        assert vaultd.proc.poll() is None
    assert _statuses(store) == [("1", True, None)]
    assert ("update confirmed", "1", "vaultd") in _updates()

    store.apply(shop.release("2", source=_mute(gguf_file, tmp_path)), lic)  # loads, answers no token
    assert _statuses(store) == [("1", False, None), ("2", True, "pending")]
    with InstalledVaultd(tmp_path / "v.sock") as vaultd:
        srv, token = _serve_vault(serve_process, vaultd, tmp_path)
        assert _bundle(srv.url, token) == "1"  # before: vaultd offered 2, unchecked, and the serve took it
        _complete(srv.url, token)
    (failed,) = store.failed()
    assert failed["version"] == "2" and failed["reason"].startswith("its health check at vaultd's start failed: "), failed
    assert "produced no tokens" in failed["reason"], failed
    assert _statuses(store) == [("1", True, None), ("2", False, "failed")]
    steps = _updates()
    assert ("update swap_failed", "2", "vaultd") in steps and ("update swap_rolled_back", "2", "vaultd") in steps, steps


@pytest.mark.slow
def test_vaultd_checks_a_pending_version_handed_over_and_refuses_one_that_fails(shop, store, serve_process, gguf_file, tmp_path):
    lic = shop.license()
    v1 = store.apply(shop.release("1"), lic)
    store.confirm("model", v1["bundle_id"])
    with InstalledVaultd(tmp_path / "v.sock") as vaultd:
        srv, token = _serve_vault(serve_process, vaultd, tmp_path)
        assert _bundle(srv.url, token) == "1"

        r = run_cli("update", "apply", str(shop.release("2", source=_mute(gguf_file, tmp_path))), timeout=600)
        line = one_line_error(r)
        assert "vaultd refused model 2" in line and "its health check in vaultd failed" in line, line
        assert "produced no tokens" in line and "the store is back on 1" in line, line
        assert _statuses(store) == [("1", True, None), ("2", False, "failed")]
        assert _bundle(srv.url, token) == "1"
        _complete(srv.url, token)

        r = run_cli("update", "apply", str(shop.release("3")), "--json", timeout=600)
        assert r.returncode == 0, r.stderr
        (a,) = json.loads(r.stdout)["served"]
        assert a["ok"] and a["relayed"] == 1 and a["pid"] == vaultd.proc.pid, a
        assert _statuses(store)[-2:] == [("3", True, None), ("2", False, "failed")]  # checked by vaultd: confirmed
        assert _wait_bundle(srv.url, token, "3") == "3", srv.output()[-2000:]
        _complete(srv.url, token)
    steps = _updates()
    assert ("update swap_rolled_back", "2", "vaultd") in steps and ("update confirmed", "3", "vaultd") in steps, steps


@pytest.mark.slow
def test_a_pending_version_that_kills_vaultd_at_its_start_is_failed_after_the_limit(
    shop, store, serve_process, tmp_path, monkeypatch
):
    """vaultd counts its starts' tries of a pending version like serve (update.start_attempts): killed -9
    while it opens version 2 (out of memory while decrypting it), the next start fails 2 unopened and
    offers 1."""
    from codemoat.updates.store import HOLD_ENV

    lic = shop.license()
    v1 = store.apply(shop.release("1"), lic)
    store.confirm("model", v1["bundle_id"])
    store.apply(shop.release("2"), lic)
    monkeypatch.setenv("CODEMOAT_UPDATE__START_ATTEMPTS", "1")
    monkeypatch.setenv(HOLD_ENV, "start")
    held = InstalledVaultd(tmp_path / "v.sock")
    marker = Path(os.environ["CODEMOAT_HOME"]) / "run" / f"held-start-{held.proc.pid}"
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert held.proc.poll() is None and time.monotonic() < deadline, held.proc.stdout.read()
        time.sleep(0.05)
    held.proc.kill()
    held.proc.wait(timeout=60)
    assert _statuses(store) == [("1", False, None), ("2", True, "pending")]
    monkeypatch.delenv(HOLD_ENV)
    with InstalledVaultd(tmp_path / "v.sock") as vaultd:
        srv, token = _serve_vault(serve_process, vaultd, tmp_path)
        assert _bundle(srv.url, token) == "1"  # before: 2 opened again by every start
    (failed,) = store.failed()
    assert failed["version"] == "2" and "tried at 1 start and" in failed["reason"], failed
    assert ("update swap_rolled_back", "2", "vaultd") in _updates()


def test_the_check_child_fails_in_one_line_on_a_descriptor_that_is_no_sealed_model(tmp_path):
    """The check's child refuses anything but a sealed memfd of the size named (an ordinary file here), in
    one line and without a traceback, so vaultd's answer names the reason."""
    from types import SimpleNamespace

    from codemoat.config import load_settings
    from codemoat.updates.vaultcheck import check_offer

    p = tmp_path / "plain.bin"
    p.write_bytes(b"\0" * 4096)
    fd = os.open(p, os.O_RDONLY)
    try:
        why = check_offer(SimpleNamespace(fd=fd, size=4096, model_id="tiny", facts={}), load_settings(None))
    finally:
        os.close(fd)
    assert why is not None and "not a sealed model file of 4096 bytes" in why and "Traceback" not in why, why
