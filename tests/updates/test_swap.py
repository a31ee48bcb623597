"""Zero-downtime swap: a running `codemoat serve` switches to an applied model bundle under load."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from updhelp import create_token

pytestmark = pytest.mark.slow


def _stream_forever(url: str, token: str, model: str, stop: threading.Event, stats: dict, lock: threading.Lock) -> None:
    body = {"model": model, "prompt": "def fibonacci(n):\n", "max_tokens": 12, "temperature": 0.0, "stream": True}
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            t = time.monotonic()
            try:
                with c.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}) as r:
                    text = "".join(r.iter_text())
                ok = r.status_code == 200 and "data: [DONE]" in text and '"error"' not in text
            except httpx.HTTPError as e:
                ok, text = False, repr(e)
            with lock:
                stats["done" if ok else "failed"] += 1
                stats["lat"].append((t, time.monotonic() - t))
                if not ok:
                    stats["errors"].append(text[-300:])


def test_swap_under_16_streaming_clients_drops_nothing(shop, store, serve_process):
    lic = shop.license()
    srv = serve_process(["--model", str(shop.moat), "--license", str(lic)])
    user, admin = create_token("--name", "dev"), create_token("--name", "ops", "--scopes", "admin")
    before = httpx.get(f"{srv.url}/health", headers={"Authorization": f"Bearer {admin}"}).json()
    store.apply(shop.release("2"), lic)
    stop, lock = threading.Event(), threading.Lock()
    stats = {"done": 0, "failed": 0, "lat": [], "errors": []}
    clients = [
        threading.Thread(target=_stream_forever, args=(srv.url, user, before["model"], stop, stats, lock)) for _ in range(16)
    ]
    for t in clients:
        t.start()
    time.sleep(3)
    r = httpx.post(f"{srv.url}/admin/api/model/swap", headers={"Authorization": f"Bearer {admin}"}, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "2"
    swapped_at = time.monotonic()
    time.sleep(3)
    stop.set()
    for t in clients:
        t.join(timeout=120)
    assert stats["failed"] == 0, stats["errors"][:3]
    assert any(t0 > swapped_at for t0, _ in stats["lat"])  # requests were served by the new model too
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
