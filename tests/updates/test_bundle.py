"""Update bundles: signed, bound to the customer's machines, gated by support, never downgraded silently."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError
from codemoat.updates.bundle import Bundle, PREFIX
from updhelp import DAY, lora_gguf


def test_model_bundle_installs_and_serves_under_its_license(shop, store):
    from codemoat.vault.clock import ClockGuard
    from codemoat.vault.container import SealedFile
    from codemoat.vault.license import License, check

    lic = shop.license()
    b1 = shop.release("1", notes="first")
    r = store.verify(b1, lic)
    assert r["bundle"]["version"] == "1" and r["installed"] is None
    out = store.apply(b1, lic)
    assert out["version"] == "1" and out["previous"] is None
    [row] = store.list()
    assert row["current"] and row["channel"] == "model" and row["notes"] == "first"
    # what got installed is a sealed model plus its own license, which the vault accepts on this machine
    grant = check(License.load(row["license"]), SealedFile(row["model"]), shop.machine, ClockGuard(shop.machine))
    assert grant.content_key is not None
    assert store.license_path.exists()  # the support license is recorded: the next apply needs no --license
    assert [s for s, _ in store.records] == ["verified", "apply_started", "applied"]


def test_the_payload_starts_on_a_page_and_an_unaligned_bundle_still_installs(shop, store, tmp_path):
    """`vendor release` pads the signed manifest so that apply copies the payload page to page; a bundle
    made before (the payload where the manifest ends) reads and installs as it did."""
    from codemoat.updates import bundle as fmt

    lic = shop.license()
    b1 = Bundle(shop.release("1"))
    assert b1.payload_offset % fmt.PAGE == 0 and set(b1.manifest["pad"]) <= {" "}
    m = dict(b1.manifest)
    old = fmt.write(tmp_path / "old.moatpkg", m, shop.vendor.signing_key, b1.pieces(), align=False)
    if Bundle(old).payload_offset % fmt.PAGE == 0:  # aligned by chance (1 in 4096): one byte more makes it not
        m["notes"] += "."
        old = fmt.write(tmp_path / "old.moatpkg", m, shop.vendor.signing_key, b1.pieces(), align=False)
    assert Bundle(old).payload_offset % fmt.PAGE != 0 and "pad" not in Bundle(old).manifest
    store.verify(old, lic)
    assert store.apply(old, lic)["version"] == "1"


def test_second_version_replaces_first_and_rollback_restores_it(shop, store):
    lic = shop.license()
    store.apply(shop.release("1"), lic)
    b2 = shop.release("2")
    assert Bundle(b2).manifest["replaces"] == "1"  # the vendor remembers what it released before
    assert store.apply(b2)["previous"] == "1"
    assert [(r["version"], r["current"]) for r in store.list()] == [("1", False), ("2", True)]
    back = store.rollback()
    assert (back["from"], back["version"]) == ("2", "1")
    assert [(r["version"], r["current"]) for r in store.list()] == [("1", True)]
    with pytest.raises(CodemoatError, match="nothing to roll back"):
        store.rollback()


def test_downgrade_and_replay_are_refused_unless_signed_as_rollback_target(shop, store):
    lic = shop.license()
    old = shop.release("1.9")
    store.apply(shop.release("2.0"), lic)
    with pytest.raises(CodemoatError, match=r"1\.9 is not newer than the installed 2\.0"):
        store.apply(old)
    with pytest.raises(CodemoatError, match="already installed"):
        store.apply(shop.release("2.0"))
    assert store.current("model")["version"] == "2.0"
    target = shop.release("1.8", rollback_target=True)
    assert store.apply(target)["version"] == "1.8"
    assert store.records[-1][0] == "applied"
    assert any(s == "refused" and "not newer" in d["reason"] for s, d in store.records)


def test_versions_compare_as_numbers(shop, store):
    lic = shop.license()
    store.apply(shop.release("1.9"), lic)
    assert store.apply(shop.release("1.10"))["version"] == "1.10"  # not "1.10" < "1.9" as strings


def test_bundle_released_after_support_is_refused_and_renewal_unlocks_it(shop, store):
    now = time.time()
    lapsed = shop.license(support_until=now - 2 * DAY)
    b = shop.release("2")
    with pytest.raises(CodemoatError) as e:
        store.apply(b, lapsed)
    msg = str(e.value)
    assert "after your support ended on" in msg and "renew support" in msg
    assert time.strftime("%Y-%m-%d", time.gmtime(now)) in msg  # the release date
    assert time.strftime("%Y-%m-%d", time.gmtime(now - 2 * DAY)) in msg  # the support date
    assert store.current("model") is None and not store.license_path.exists()
    renewed = shop.license(support_until=now + 365 * DAY)
    assert store.apply(b, renewed)["version"] == "2"  # the same waiting bundle, unlocked


def test_installed_model_keeps_working_after_support_ends(shop, store):
    from codemoat.vault.clock import ClockGuard
    from codemoat.vault.container import SealedFile
    from codemoat.vault.license import License, check

    lic = shop.license(support_until=time.time() + DAY)
    store.apply(shop.release("1"), lic)
    shop.license(support_until=time.time() - DAY)  # the vendor's latest terms: support over
    b2 = shop.release("2")  # carries a license with the lapsed support date
    with pytest.raises(CodemoatError, match="after your support ended"):
        store.apply(b2, shop.license(support_until=time.time() - DAY))
    [row] = store.list()
    check(License.load(row["license"]), SealedFile(row["model"]), shop.machine, ClockGuard(shop.machine))


def test_license_without_support_until_is_supported_until_it_expires(shop, store):
    old_style = shop.license()  # issued as before support contracts: no support_until field
    assert "support_until" not in json.loads(old_style.read_text())["license"]
    assert store.apply(shop.release("1", released_at=int(time.time() + 10 * DAY)), old_style)["version"] == "1"
    with pytest.raises(CodemoatError, match="after your support ended"):
        store.apply(shop.release("2", released_at=int(time.time() + 31 * DAY)))


def test_bundle_for_another_machine_or_customer_is_refused(shop, store):
    from codemoat.vault.machine import MachineKey

    other = MachineKey.generate()
    shop.license(machine=other)  # the customer's latest license names another machine
    b = shop.release("1")
    with pytest.raises(CodemoatError, match="license .* is for another machine"):
        store.apply(b, shop.license(machine=other))
    with pytest.raises(CodemoatError, match="bundle is for other machines"):
        store.apply(b, shop.license())  # a valid license for this machine does not make the bundle ours
    beta_lic = shop.license(customer="beta")
    with pytest.raises(CodemoatError, match="bundle is for customer 'acme', this license is for 'beta'"):
        store.apply(shop.release("2"), beta_lic)


def test_bundle_from_another_vendor_is_refused(shop, store, tmp_path):
    from codemoat.vault.vendor import Vendor
    from updhelp import Shop

    lic = shop.license()
    store.apply(shop.release("1"), lic)
    rogue = Vendor.init(tmp_path / "rogue")
    try:
        evil = Shop(rogue, shop.machine, shop.gguf, tmp_path / "rogue-shop")
        evil.license()
        with pytest.raises(CodemoatError, match="signed by vendor"):
            store.apply(evil.release("9"))
    finally:
        rogue.close()


def test_newer_codemoat_required_is_refused(shop, store):
    lic = shop.license()
    with pytest.raises(CodemoatError, match="needs codemoat 99.0 or newer"):
        store.apply(shop.release("1", min_codemoat="99.0"), lic)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["manifest", "signature", "payload", "last", "version", "reserved"])
def test_any_changed_byte_is_refused_before_install(shop, store, where):
    lic = shop.license()
    b = shop.release("1")
    mlen = PREFIX.unpack(b.read_bytes()[: PREFIX.size])[3]
    offset = {
        "manifest": PREFIX.size + 40,
        "signature": PREFIX.size + mlen + 5,
        "payload": PREFIX.size + mlen + 64 + 100,
        "last": b.stat().st_size - 1,
        "version": 9,
        "reserved": 11,
    }[where]
    _flip(b, offset)
    with pytest.raises(CodemoatError):
        store.apply(b, lic)
    assert store.current("model") is None
    assert not any((store.root / "bundles").glob("*")) if (store.root / "bundles").exists() else True


def test_truncated_extended_and_foreign_files_are_refused(shop, store, tmp_path):
    lic = shop.license()
    b = shop.release("1")
    data = b.read_bytes()
    for name, blob, why in (
        ("short", data[:-1], "truncated"),
        ("long", data + b"\0", "trailing"),
        ("tiny", data[:10], "too short"),
        ("magic", b"X" + data[1:], "bad magic"),
    ):
        p = tmp_path / f"{name}.moatpkg"
        p.write_bytes(blob)
        with pytest.raises(CodemoatError, match=why):
            store.apply(p, lic)


def test_adapter_is_sealed_to_the_machine(shop, store, tmp_path):
    from codemoat.updates.bundle import payload_context
    from codemoat.vault.machine import MachineKey
    from codemoat.vault.payload import open_payload

    adapter = tmp_path / "lora.gguf"
    lora_gguf(adapter, 64)
    lic = shop.license()
    b = shop.release("1", kind="adapter", source=adapter)
    assert adapter.read_bytes()[4:260] not in b.read_bytes()  # sealed, not copied
    out = store.apply(b, lic)
    m = json.loads((Path(out["dir"]) / "manifest.json").read_text())
    blob = (Path(out["dir"]) / "payload.sealed").read_bytes()
    assert open_payload(blob, m["keys"], shop.machine, payload_context(m)) == adapter.read_bytes()
    with pytest.raises(CodemoatError, match="not sealed for this machine"):
        open_payload(blob, m["keys"], MachineKey.generate(), payload_context(m))
    moved = dict(m, version="9")  # the same blob presented as another bundle does not open
    with pytest.raises(CodemoatError):
        open_payload(blob, m["keys"], shop.machine, payload_context(moved))
    assert [r["channel"] for r in store.list()] == ["adapter:lora"]


def test_support_until_of_the_wrong_type_is_refused_even_when_signed(shop):
    from codemoat.vault.codec import b64e, canonical, sign
    from codemoat.vault.license import DOMAIN, License

    doc = json.loads(shop.license(support_until=time.time() + DAY).read_text())
    assert License.parse(json.dumps(doc).encode()).body["support_until"] > time.time()
    for bad in ("2099-01-01", True, 1.5):
        body = dict(doc["license"], support_until=bad)
        forged = dict(doc, license=body, signature=b64e(sign(shop.vendor.signing_key, DOMAIN, canonical(body))))
        with pytest.raises(CodemoatError, match="support_until"):
            License.parse(json.dumps(forged).encode())
