"""One serve's failed swap rolls the store back only while no serve has checked the version (pending). A
version another serve's check passed stays current: before, the failing serve (its own out-of-memory,
its own device) called store.fail unconditionally, which made the version before current again for
every serve and every next start, and recorded a version that serves elsewhere as failed. A real serve,
real bundles; the other serve's check is its real effect on the store (store.confirm)."""

from __future__ import annotations

import pytest

from updhelp import mute_gguf


@pytest.mark.slow
def test_a_failed_swap_keeps_a_version_another_serve_confirmed(shop, store, serve_process, gguf_file, tmp_path):
    from codemoat.updates.handoff import hand_over

    lic = shop.license()
    store.apply(shop.release("1"), lic)
    srv = serve_process(["--model", "update:model"])  # confirms 1 at its start
    mute = mute_gguf(gguf_file, tmp_path / "mute.gguf")  # no tokens: this serve's health check fails

    # the negative: nobody checked 2, so this serve's failure rolls the store back
    v2 = store.apply(shop.release("2", source=mute), lic)
    (a,) = hand_over("model")
    assert a["ok"] is False and a["pid"] == srv.proc.pid and "the store is back on 1" in a["error"], a
    assert store.current("model")["version"] == "1" and [f["version"] for f in store.failed()] == ["2"]
    assert v2["bundle_id"] not in store.state()["bundles"]

    # the positive: another serve's check passed 3 first; this serve's failure is its own, the store keeps 3
    v3 = store.apply(shop.release("3", source=mute), lic)
    assert store.confirm("model", v3["bundle_id"])
    (a,) = hand_over("model")
    assert a["ok"] is False and a["pid"] == srv.proc.pid, a
    assert "another server's check passed it, so the store keeps it" in a["error"], a
    assert "back on" not in a["error"], a
    cur = store.current("model")
    assert cur["bundle_id"] == v3["bundle_id"] and not cur.get("pending")
    assert [f["version"] for f in store.failed()] == ["2"]  # 3 is not recorded failed
    assert ("swap_rolled_back", "3") not in [(s, d.get("failed")) for s, d in store.records]
