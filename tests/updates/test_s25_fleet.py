"""Several serves sharing one update store. One serve's failure rolls the store back only while no serve has
checked the version (pending); a version another serve's check passed stays current for the fleet:

- at serve start (serve.swapping.check_installed_at_start), which before called store.fail unconditionally:
  two serves starting on one pending version, one failing its check after the other passed it, rolled back
  the version the other served well. Now the store keeps it and the failing serve serves the version kept
  before it, for itself only (or, with none, unloads with the reason);
- for adapters, which had no pending/confirmed record: one serve's failed adapter swap rolled the adapter back
  for every serve.

And a serve whose swap hangs is given up on by `update apply` (updates.handoff's stall bound) and recorded lost.

Real serves, real bundles; the other serve's check is its real effect on the store (store.confirm), made
while this serve is held at the point it reports (store.hold: $CODEMOAT_HOME/run/held-NAME-PID, polled)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from codemoat.updates.handoff import STALL_ENV
from codemoat.updates.store import HOLD_ENV
from tests.tune.loras import forcing_lora_gguf
from updhelp import FOX, adapter_text, create_token, mute_gguf, wait_unavailable

KEPT = "another server's check passed it, so the store keeps it"


def _held(name: str, pid: int, proc) -> Path:
    """The marker serve `pid` creates once it is held at `name` (polled, never slept on)."""
    marker = Path(os.environ["CODEMOAT_HOME"]) / "run" / f"held-{name}-{pid}"
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the serve never got there"
        time.sleep(0.05)
    return marker


def _health(url: str, admin: str) -> dict:
    return httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {admin}"}, timeout=60).json()


def _records() -> list[tuple[str, dict]]:
    from codemoat.audit.log import AuditLog
    from codemoat.db import open_db

    return [(r["route"], r["detail"] or {}) for r in AuditLog(open_db()).records(kind="update", limit=200)]


def _start_held(serve_process, name: str):
    srv = serve_process(["--model", "update:model"], env={HOLD_ENV: name}, wait=False)
    return srv, _held(name, srv.proc.pid, srv.proc)


@pytest.mark.slow
def test_a_start_whose_check_fails_keeps_a_version_another_serve_confirmed(shop, store, serve_process, gguf_file, tmp_path):
    lic = shop.license()
    v1 = store.apply(shop.release("1"), lic)
    store.confirm("model", v1["bundle_id"])
    mute = mute_gguf(gguf_file, tmp_path / "mute.gguf")  # loads, produces no token: its check fails in every serve
    admin = create_token("--name", "ops", "--scopes", "admin")

    # the negative: nobody else checked 2 while this serve did, so its failure rolls the store back
    v2 = store.apply(shop.release("2", source=mute), lic)
    srv, marker = _start_held(serve_process, "start_check")
    marker.unlink()
    srv.wait_ready()
    assert _health(srv.url, admin)["bundle"]["version"] == "1"
    assert store.current("model")["bundle_id"] == v1["bundle_id"] and [f["version"] for f in store.failed()] == ["2"]
    assert v2["bundle_id"] not in store.state()["bundles"]
    srv.stop()

    # the positive: another serve's check passed 3 while this one checked it; this serve's failure is its own
    v3 = store.apply(shop.release("3", source=mute), lic)
    srv, marker = _start_held(serve_process, "start_check")
    assert store.confirm("model", v3["bundle_id"])  # as the serve started beside it does, its check passed
    marker.unlink()
    srv.wait_ready()
    cur = store.current("model")
    assert cur["bundle_id"] == v3["bundle_id"] and not cur.get("pending")  # the fleet's version stays
    assert [f["version"] for f in store.failed()] == ["2"]  # 3 is not recorded failed
    assert store.state()["channels"]["model"]["history"] == [v1["bundle_id"]]
    health = _health(srv.url, admin)  # and this serve does not serve what failed here: 1, for itself only
    assert health["status"] == "ok" and health["bundle"]["version"] == "1", health
    user = create_token("--name", "dev")
    body = {"model": health["model"], "prompt": "def add(a, b):\n    return", "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {user}"}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    recs = _records()
    assert not [d for s, d in recs if s == "update swap_rolled_back" and d.get("failed") == "3"]
    assert [d for s, d in recs if s == "update swapped" and d.get("version") == "1" and d.get("this_server_only")]
    assert "this server serves 1, kept before it, until it restarts" in srv.output()


@pytest.mark.slow
def test_a_first_version_another_serve_confirmed_is_not_served_where_its_check_failed(
    shop, store, serve_process, gguf_file, tmp_path
):
    lic = shop.license()
    v1 = store.apply(shop.release("1", source=mute_gguf(gguf_file, tmp_path / "mute.gguf")), lic)
    srv, marker = _start_held(serve_process, "start_check")
    assert store.confirm("model", v1["bundle_id"])
    marker.unlink()
    wait_unavailable(srv)  # it starts, and says it is not serving, rather than serving what failed here
    user = create_token("--name", "dev")
    body = {"model": "mute", "prompt": "def add(a, b):\n    return", "max_tokens": 4}
    r = httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {user}"}, timeout=60)
    assert r.status_code == 503 and KEPT in r.text and "no version kept before it passed here" in r.text, r.text
    assert store.current("model")["bundle_id"] == v1["bundle_id"] and store.failed() == []


@pytest.mark.slow
def test_an_adapter_another_serve_confirmed_survives_this_serves_failed_swap(
    shop, store, machine, serve_process, gguf_file, tmp_path
):
    from codemoat.updates.handoff import hand_over
    from codemoat.updates.store import UpdateStore

    lic = shop.license()
    other = tmp_path / "other.gguf"  # another base: the serves that serve it pass what this one refuses
    other.write_bytes(gguf_file.read_bytes() + b"another model")
    elsewhere = UpdateStore(machine=machine, models=[other])
    fox, dog = tmp_path / "fox.gguf", tmp_path / "dog.gguf"
    fox.write_bytes(forcing_lora_gguf(gguf_file, "Ġfox"))
    dog.write_bytes(forcing_lora_gguf(gguf_file, "Ġdog"))
    v1 = store.apply(shop.release("1", kind="adapter", source=fox, name="fee"), lic)
    assert store.pending("adapter:fee", v1["bundle_id"])  # adapters are pending too, until a serve's check

    user, admin = create_token("--name", "dev"), create_token("--name", "ops", "--scopes", "admin")
    srv = serve_process(
        ["--model", str(shop.moat), "--license", str(lic)], env={"CODEMOAT_MODEL__ADAPTERS": json.dumps(["update:fee"])}
    )
    model = _health(srv.url, admin)["model"]
    v2 = store.apply(shop.release("2", kind="adapter", source=fox, name="fee"), lic)
    (a,) = hand_over("adapter:fee")
    assert a["ok"] and a["swapped"], a
    assert not store.pending("adapter:fee", v2["bundle_id"])  # its swap passed: confirmed
    assert adapter_text(srv.url, user, model) == FOX

    # the negative: nobody checked 3 (for another base): this serve's failure rolls the store back
    elsewhere.apply(shop.release("3", kind="adapter", source=dog, name="fee", base_model=other), lic)
    (a,) = hand_over("adapter:fee")
    assert not a["ok"] and "is for base model" in a["error"] and "the store is back on 2" in a["error"], a
    assert store.current("adapter:fee")["bundle_id"] == v2["bundle_id"] and [f["version"] for f in store.failed()] == ["3"]

    # the positive: a serve of the other base checked 4 first: this serve's failure is its own, the store keeps 4
    v4 = elsewhere.apply(shop.release("4", kind="adapter", source=dog, name="fee", base_model=other), lic)
    assert store.confirm("adapter:fee", v4["bundle_id"])
    (a,) = hand_over("adapter:fee")
    assert not a["ok"] and KEPT in a["error"] and "back on" not in a["error"], a
    cur = store.current("adapter:fee")
    assert cur["bundle_id"] == v4["bundle_id"] and not cur.get("pending")
    assert [f["version"] for f in store.failed()] == ["3"]
    assert adapter_text(srv.url, user, model) == FOX  # this serve serves 2 on


@pytest.mark.slow
def test_a_serve_whose_swap_hangs_is_given_up_on_and_recorded_lost(shop, store, serve_process):
    from codemoat.cli.updates_cmd import _lost_swaps
    from codemoat.updates.handoff import hand_over

    lic = shop.license()
    v1 = store.apply(shop.release("1"), lic)
    admin = create_token("--name", "ops", "--scopes", "admin")
    srv = serve_process(["--model", "update:model"], env={HOLD_ENV: "swap", STALL_ENV: "1"})
    assert not store.pending("model", v1["bundle_id"])
    v2 = store.apply(shop.release("2"), lic)
    # its swap blocks where it loads the new engine (store.hold): progress at once (then every PROGRESS_S, 5 s),
    # none once a second passed there; apply's silence is twice the serve's progress interval, so only a serve
    # that stopped vouching falls silent, and its overall limit is far above when the silence ends it
    (a,) = hand_over("model", silence=10, timeout=60)
    assert a["ok"] is False and a["lost"] and a["silent"] and "(hung or stopped, at stage '" in a["error"], a
    assert "still swapping" not in a["error"]  # the stall ended it, not apply's overall limit
    (a,) = _lost_swaps(store, "model", v2["bundle_id"], [a])
    assert "recorded as failed, the store is back on 1" in a["error"], a
    assert store.current("model")["bundle_id"] == v1["bundle_id"]
    deadline = time.monotonic() + 120  # the serve says why in its log, at its next progress tick
    while "its swap has been at stage 'loading'" not in srv.output():
        assert time.monotonic() < deadline, srv.output()
        time.sleep(0.1)

    # let the hung swap go on: the version it was loading is gone, and the serve serves 1 on
    _held("swap", srv.proc.pid, srv.proc).unlink()
    deadline = time.monotonic() + 120
    while not [d for s, d in _records() if s == "update swap_failed" and d.get("version") == "2"]:
        assert time.monotonic() < deadline, srv.output()
        time.sleep(0.1)
    assert _health(srv.url, admin)["bundle"]["version"] == "1"
    assert store.current("model")["bundle_id"] == v1["bundle_id"]


def _first_token(gguf_file: Path) -> str:
    """Token 0 of the test model's vocabulary: its end-of-text token (updhelp.mute_gguf)."""
    import gguf

    f = gguf.GGUFReader(str(gguf_file)).fields["tokenizer.ggml.tokens"]
    return bytes(f.parts[f.data[0]]).decode()


@pytest.mark.slow
def test_a_pending_adapter_is_checked_at_serve_start(shop, store, serve_process, gguf_file, tmp_path):
    """An adapter installed while no serve ran was served unchecked and stayed pending, so the first serve
    whose swap of it failed later still rolled it back for all: a start now checks and confirms it."""
    lic = shop.license()
    fox, mute = tmp_path / "fox.gguf", tmp_path / "mute.gguf"
    fox.write_bytes(forcing_lora_gguf(gguf_file, "Ġfox"))
    mute.write_bytes(forcing_lora_gguf(gguf_file, _first_token(gguf_file)))  # end of text first: no token
    v1 = store.apply(shop.release("1", kind="adapter", source=fox, name="fee"), lic)
    args, env = ["--model", str(shop.moat), "--license", str(lic)], {"CODEMOAT_MODEL__ADAPTERS": '["update:fee"]'}
    srv = serve_process(args, env=env)
    assert not store.pending("adapter:fee", v1["bundle_id"])  # its check at start passed: confirmed
    assert [d for s, d in _records() if s == "update confirmed" and d.get("channel") == "adapter:fee"]
    srv.stop()

    # the negative: a version that answers nothing fails its check at start, is recorded failed, and 1 serves
    v2 = store.apply(shop.release("2", kind="adapter", source=mute, name="fee"), lic)
    srv = serve_process(args, env=env)
    assert store.current("adapter:fee")["bundle_id"] == v1["bundle_id"]
    (failed,) = store.failed()
    assert failed["bundle_id"] == v2["bundle_id"] and "health check at serve start failed" in failed["reason"], failed
    user, admin = create_token("--name", "dev"), create_token("--name", "ops", "--scopes", "admin")
    assert adapter_text(srv.url, user, _health(srv.url, admin)["model"]) == FOX
