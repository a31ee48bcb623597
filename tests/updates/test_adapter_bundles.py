"""Vendor adapter bundles: installed by `update apply`, served by group (`model.adapters = ["update:NAME"]`)
over a sealed base, and a new version swapped in under 16 streaming clients without a failure, audited."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from tests.tune.loras import forcing_lora_gguf, random_lora_gguf
from updhelp import Streams, create_token

PROMPT = "def interchange_fee(amount_cents: int) -> int:\n    return"
# the adapters force one token at every step (tests/tune/loras.py), so the answer with each is known exactly:
# a random adapter sometimes left the greedy answer of the base, whose per-customer fingerprint is random, unchanged
FOX, DOG = " fox" * 12, " dog" * 12


def _text(url: str, token: str, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _memfds(pid: int, name: str) -> int:
    """How many of the adapter's memfds process `pid` holds open."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"/memfd:codemoat-adapter-{name} ")
        except OSError:
            pass
    return n


def _update_records() -> list[dict]:
    from codemoat.audit.log import AuditLog
    from codemoat.db import open_db

    return list(AuditLog(open_db()).records(kind="update", limit=100))


@pytest.mark.slow
def test_vendor_adapter_served_by_group_and_swapped_without_downtime(shop, store, serve_process, gguf_file, tmp_path):
    from codemoat.accounts import Accounts
    from codemoat.db import open_db

    lic = shop.license()
    lora = tmp_path / "fee.gguf"
    lora.write_bytes(forcing_lora_gguf(gguf_file, "Ġfox"))
    store.apply(shop.release("1", kind="adapter", source=lora), lic, groups=["payments"])

    accounts = Accounts(open_db())
    accounts.add_user("alice", ["payments"])
    accounts.add_user("carol", ["contractors"])
    alice, carol = (accounts.create_token(f"{u}-editor", user=u)[1] for u in ("alice", "carol"))
    admin = create_token("--name", "ops", "--scopes", "admin")
    h = {"Authorization": f"Bearer {admin}"}
    srv = serve_process(
        ["--model", str(shop.moat), "--license", str(lic)], env={"CODEMOAT_MODEL__ADAPTERS": json.dumps(["update:fee"])}
    )
    model = httpx.get(f"{srv.url}/health", headers=h).json()["model"]

    v1, base = _text(srv.url, alice, model), _text(srv.url, carol, model)
    assert v1 == FOX and base != FOX  # alice (payments) gets base + the vendor's adapter; carol gets the base
    from codemoat.audit.log import AuditLog

    recs = {r["user"]: r for r in AuditLog(open_db()).records(kind="request", limit=50) if r["user"] in ("alice", "carol")}
    assert recs["alice"]["detail"].get("adapter") == "fee" and "adapter" not in recs["carol"]["detail"]

    store.apply(shop.release("2"), lic)  # a model swap first: the adapter swap then reloads the new model
    r = httpx.post(f"{srv.url}/admin/api/model/swap", headers=h, timeout=300)
    assert r.status_code == 200 and r.json()["version"] == "2", r.text
    assert _text(srv.url, alice, model) == FOX and _text(srv.url, carol, model) != FOX  # v2 of the model still has fee 1

    lora.write_bytes(forcing_lora_gguf(gguf_file, "Ġdog"))
    store.apply(shop.release("2", kind="adapter", source=lora), lic)  # keeps the groups chosen for v1
    assert _memfds(srv.proc.pid, "fee") == 1
    body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0.0}
    with Streams(srv.url, alice, body, clients=16) as streams:
        time.sleep(3)
        r = httpx.post(f"{srv.url}/admin/api/model/swap", headers=h, json={"adapter": "fee"}, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["adapter"] == "fee" and r.json()["version"] == "2"
        swapped_at = time.monotonic()
        time.sleep(3)
        new_served = streams.served_after(swapped_at)  # requests were served by the new engine too
    assert streams.stats["failed"] == 0, streams.stats["errors"][:3]
    assert new_served
    deadline = time.monotonic() + 60  # v1's memfd is closed once the old engine's streams are done
    while _memfds(srv.proc.pid, "fee") != 1:
        assert time.monotonic() < deadline, f"{_memfds(srv.proc.pid, 'fee')} memfds of adapter fee are still open"
        time.sleep(0.2)

    v2 = _text(srv.url, alice, model)
    assert v2 == DOG  # the new version answers alice
    assert _text(srv.url, carol, model) != v2  # and still not carol

    bad = httpx.post(f"{srv.url}/admin/api/model/swap", headers=h, json={"adapter": "nosuch"}, timeout=120)
    assert bad.status_code >= 400 and "no adapter bundle named 'nosuch'" in bad.text
    assert _text(srv.url, alice, model) == v2  # a failed swap changes nothing
    steps = [(r["route"], r["user"], r["detail"]) for r in _update_records()]
    assert any(
        s == "update swapped" and u == "ops" and d.get("adapter") == "fee" and d.get("version") == "2" for s, u, d in steps
    )
    assert any(s == "update swap_failed" and d.get("adapter") == "nosuch" for s, _, d in steps)


@pytest.mark.slow
def test_adapter_reference_without_an_installed_bundle_is_one_line(serve_process, gguf_file, machine):
    srv = serve_process(["--model", str(gguf_file)], env={"CODEMOAT_MODEL__ADAPTERS": '["update:nosuch"]'}, wait=False)
    assert srv.proc.wait(timeout=120) == 1
    out = srv.output()
    assert "Traceback" not in out and "no adapter bundle named 'nosuch' is installed" in out, out


def test_vendor_adapter_groups_are_recorded_kept_and_enforced(shop, store, gguf_file, tmp_path):
    from codemoat.engines.adapters import LoadedAdapter
    from codemoat.errors import CodemoatError
    from codemoat.serve.adapters import choose, eligible
    from codemoat.updates.adapters import open_installed

    lic = shop.license()
    lora = tmp_path / "fee.gguf"
    lora.write_bytes(random_lora_gguf(gguf_file, seed=0))
    store.apply(shop.release("1", kind="adapter", source=lora), lic, groups=["payments", "finance"])
    store.apply(shop.release("2", kind="adapter", source=lora), lic)  # no --groups: v1's choice is kept
    got = open_installed("fee")
    assert (got.version, got.groups, got.gguf) == ("2", ("finance", "payments"), lora.read_bytes())

    vendor = LoadedAdapter("fee", (), None, -1, got.groups, got.version)
    assert eligible(vendor, ["payments"], set()) and eligible(vendor, ["admin"], set())
    assert not eligible(vendor, ["contractors"], set()) and not eligible(vendor, [], set())
    everyone = LoadedAdapter("all", (), None, -1, ("everyone",), "1")
    assert eligible(everyone, [], set())
    tuned = LoadedAdapter("pay", (("payments", ("payments",)),), "0" * 64, -1)
    assert choose([tuned, vendor], ["payments"], set()) is vendor  # the tuned one needs the repository readable now
    assert choose([tuned, vendor], ["payments"], {"payments"}) is tuned
    assert choose([tuned, vendor], ["contractors"], {"payments"}) is None

    text = tmp_path / "notes.txt"
    text.write_bytes(b"not a LoRA")
    with pytest.raises(CodemoatError, match="an adapter is a .gguf or .safetensors file"):  # refused at release now
        shop.release(
            "1", kind="adapter", source=text, name="notes"
        )  # (and at apply, a bundle made otherwise: test_update_attacks)
    with pytest.raises(CodemoatError, match="no adapter bundle named 'notes'"):
        open_installed("notes")
