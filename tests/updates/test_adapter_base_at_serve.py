"""A vendor adapter's base is checked again whenever serve builds an engine with it, not only at `update
apply`: an adapter for another base is not served (one line in the log; a swap to it is refused in one
line, the store rolled back) and the base, or the version before, serves on."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.tune.loras import forcing_lora_gguf
from updhelp import FOX, adapter_text, create_token


@pytest.mark.slow
def test_adapter_for_another_base_is_not_served_and_the_base_serves_on(shop, machine, serve_process, gguf_file, tmp_path):
    from codemoat.updates.handoff import hand_over
    from codemoat.updates.store import UpdateStore

    lic = shop.license()
    other = tmp_path / "other.gguf"  # another base model: its digest is all the bundle keeps of it
    other.write_bytes(gguf_file.read_bytes() + b"another model")
    # installed while `other` was (also) this machine's model: the install-time check passes
    elsewhere = UpdateStore(machine=machine, models=[other])
    fox, dog = tmp_path / "fox.gguf", tmp_path / "dog.gguf"
    fox.write_bytes(forcing_lora_gguf(gguf_file, "Ġfox"))
    dog.write_bytes(forcing_lora_gguf(gguf_file, "Ġdog"))
    elsewhere.apply(shop.release("1", kind="adapter", source=fox, name="fee", base_model=other), lic)

    user, admin = create_token("--name", "dev"), create_token("--name", "ops", "--scopes", "admin")
    srv = serve_process(
        ["--model", str(shop.moat), "--license", str(lic)], env={"CODEMOAT_MODEL__ADAPTERS": json.dumps(["update:fee"])}
    )
    model = httpx.get(f"{srv.url}/health", headers={"Authorization": f"Bearer {admin}"}).json()["model"]
    assert adapter_text(srv.url, user, model) != FOX  # the base, without the adapter made for another one
    [line] = [x for x in srv.output().splitlines() if "vendor adapter 'fee' 1 is for base model" in x]
    assert "not served" in line

    # the vendor's release for this base is swapped in by `update apply`'s hand-off
    right = UpdateStore(machine=machine, models=[shop.moat])
    right.apply(shop.release("2", kind="adapter", source=fox, name="fee"), lic)
    (a,) = hand_over("adapter:fee")
    assert a["ok"] and a["swapped"], a
    assert adapter_text(srv.url, user, model) == FOX

    # a version for another base is refused by the running serve in one line; v2 serves on, the store goes back to it
    elsewhere.apply(shop.release("3", kind="adapter", source=dog, name="fee", base_model=other), lic)
    (a,) = hand_over("adapter:fee")
    assert not a["ok"] and "is for base model" in a["error"] and "\n" not in a["error"], a
    assert adapter_text(srv.url, user, model) == FOX
    assert right.current("adapter:fee")["version"] == "2"
    assert [f["version"] for f in right.failed()] == ["3"]


@pytest.mark.slow
def test_another_sealed_model_put_in_the_served_ones_place_is_not_served_the_adapter(
    shop, machine, serve_process, gguf_file, tmp_path
):
    """Attacker: a sealed base's digest is taken from its signed header (every chunk's GCM tag binds the
    header), not hashed at each start and not cached by path: another sealed model, with its own license,
    put in the served one's place (same path, size and times) is checked as what it is, and the adapter
    released for the first is not served with it."""
    import os
    import time

    from codemoat.updates.store import UpdateStore

    lic = shop.license()
    fox = tmp_path / "fox.gguf"
    fox.write_bytes(forcing_lora_gguf(gguf_file, "Ġfox"))
    UpdateStore(machine=machine, models=[shop.moat]).apply(shop.release("1", kind="adapter", source=fox, name="fee"), lic)
    user, admin = create_token("--name", "dev"), create_token("--name", "ops", "--scopes", "admin")
    args, env = ["--model", str(shop.moat), "--license", str(lic)], {"CODEMOAT_MODEL__ADAPTERS": json.dumps(["update:fee"])}
    srv = serve_process(args, env=env)
    model = httpx.get(f"{srv.url}/health", headers={"Authorization": f"Bearer {admin}"}).json()["model"]
    assert adapter_text(srv.url, user, model) == FOX  # its own base: served with the adapter
    srv.stop()

    other = tmp_path / "other" / gguf_file.name  # the same model but for one weight byte: same size, same name
    other.parent.mkdir()
    data = bytearray(gguf_file.read_bytes())
    data[-1] ^= 1
    other.write_bytes(data)
    swapped = tmp_path / "other.moat"
    shop.vendor.seal(other, "acme", swapped)
    doc = shop.vendor.issue_license(
        customer="acme", model=swapped, machines=[machine.identity()], expires=int(time.time()) + 86400
    )
    was = shop.moat.stat()
    assert swapped.stat().st_size == was.st_size
    os.replace(swapped, shop.moat)
    os.utime(shop.moat, ns=(was.st_atime_ns, was.st_mtime_ns))
    lic.write_text(json.dumps(doc))

    srv = serve_process(args, env=env)
    assert httpx.get(f"{srv.url}/health", headers={"Authorization": f"Bearer {admin}"}).json()["model"] == model
    assert adapter_text(srv.url, user, model) != FOX  # the base alone
    [line] = [x for x in srv.output().splitlines() if "vendor adapter 'fee' 1 is for base model" in x]
    assert "not served" in line
