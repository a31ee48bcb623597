"""Offline licenses: a valid one opens the model; each failure class is refused with its own message."""

from __future__ import annotations

import json
import time

import pytest

from codemoat.vault.clock import ClockGuard, ManualClock
from codemoat.vault.codec import VaultError
from codemoat.vault.license import License, check
from codemoat.vault.machine import MachineKey, collect_facts, match_facts, parse_identity
from codemoat.vault.vendor import Vendor
from codemoat.vault.verify import verify_bundle
from ggufs import write_gguf
from vaulthelp import bundle, cli, one_line_error


@pytest.fixture
def model(model):
    """50 kB: four chunks of 16 kB in test_offline_round_trip."""
    write_gguf(model, 50_000)
    return model


def test_offline_round_trip(vendor, machine, model, tmp_path):
    moat, lic, doc = bundle(vendor, model, tmp_path / "out", machine, chunk_size=16384)
    report = verify_bundle(moat, lic)
    assert report["ok"] and report["customer"] == "acme" and report["machine_id"] == machine.id
    assert "all 4 chunks authenticated" in report["checks"][-1]
    # The license holds no plaintext key: only the wrapped form.
    cust = vendor.find_customer("acme")
    raw = lic.read_bytes()
    assert vendor.content_key(doc["license"]["model"]["file_id"]).hex() not in raw.decode()
    assert cust.watermark_secret.hex() not in raw.decode()


def test_watermark_key_delivered_only_when_asked(vendor, machine, model, tmp_path):
    moat, lic, _ = bundle(vendor, model, tmp_path / "a", machine)
    g = check(
        License.load(lic), __import__("codemoat.vault.container", fromlist=["x"]).SealedFile(moat), machine, ClockGuard(machine)
    )
    assert g.watermark_key == vendor.find_customer("acme").watermark_secret
    moat2, lic2, _ = bundle(vendor, model, tmp_path / "b", machine, watermark=False)
    from codemoat.vault.container import SealedFile

    g2 = check(License.load(lic2), SealedFile(moat2), machine, ClockGuard(machine))
    assert g2.watermark_key is None and g2.content_key is not None


def test_license_copied_to_second_identity_refused(vendor, machine, model, tmp_path, monkeypatch):
    moat, lic, _ = bundle(vendor, model, tmp_path / "out", machine)
    assert verify_bundle(moat, lic)["ok"]
    monkeypatch.setenv("CODEMOAT_HOME", str(tmp_path / "second-home"))
    other = MachineKey.load_or_create()  # same hardware, another machine key
    assert other.id != machine.id
    with pytest.raises(VaultError, match=f"license is for another machine .*this machine is {other.id}"):
        verify_bundle(moat, lic)


def test_forged_machine_entry_cannot_unwrap(vendor, machine, model, tmp_path):
    # Even a license naming machine B's id with A's wrapped key fails for B: the key is wrapped to A.
    from codemoat.vault.codec import unwrap
    from codemoat.vault.license import key_context

    _, lic, doc = bundle(vendor, model, tmp_path / "out", machine)
    other = MachineKey.generate()
    with pytest.raises(VaultError, match="cannot be unwrapped"):
        unwrap(
            other.x25519, doc["license"]["keys"]["content_key"], key_context("content-key", doc["license"]["id"]), "content key"
        )


def test_hardware_policy(vendor, model, tmp_path, monkeypatch):
    facts = {"machine_id": "a" * 32, "cpu": "b" * 32, "macs": ["c" * 32, "d" * 32], "product_uuid": "e" * 32}
    # one network card replaced: still 4 of 4 groups (another card matches); machine-id changed too: 3 of 4
    moved = dict(facts, macs=["c" * 32, "f" * 32])
    assert match_facts(facts, moved, "most") == (True, 4, 4)
    assert match_facts(facts, dict(moved, machine_id="0" * 32), "most") == (True, 3, 4)
    assert match_facts(facts, {"cpu": "b" * 32, "macs": ["9" * 32]}, "most") == (False, 1, 4)
    assert match_facts(facts, {"cpu": "b" * 32}, "any")[0] and not match_facts(facts, dict(facts, cpu="x"), "all")[0]

    # Through a real license: the machine key matches, but the hardware does not.
    key = MachineKey.load_or_create()
    stranger = MachineKey(key.x25519, key.ed25519, facts)
    moat, lic, _ = bundle(vendor, model, tmp_path / "out", stranger)
    with pytest.raises(VaultError, match=r"hardware does not match the license: \d of \d facts match, policy 'most'"):
        verify_bundle(moat, lic)


def test_collect_facts_from_a_fake_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/machine-id").write_text("abc\n")
    (root / "proc").mkdir()
    (root / "proc/cpuinfo").write_text("processor : 0\nmodel name\t: Test CPU 9000\n")
    for name, mac, dev in (("eth0", "02:00:00:00:00:01", True), ("veth9", "02:00:00:00:00:02", False)):
        d = root / "sys/class/net" / name
        d.mkdir(parents=True)
        (d / "address").write_text(mac)
        if dev:
            (d / "device").mkdir()
    f = collect_facts(str(root))
    assert set(f) == {"machine_id", "cpu", "macs"} and len(f["macs"]) == 1
    assert "abc" not in json.dumps(f) and "Test CPU" not in json.dumps(f)


def test_expired_and_not_yet_valid(vendor, machine, model, tmp_path):
    moat2, lic2, _ = bundle(vendor, model, tmp_path / "b", machine, not_before=int(time.time()) + 86400)
    with pytest.raises(VaultError, match="license is not valid until"):
        verify_bundle(moat2, lic2)
    moat, lic, _ = bundle(vendor, model, tmp_path / "a", machine, days=1)
    clock = ManualClock()
    clock.advance(2 * 86400)
    with pytest.raises(VaultError, match="license expired on"):
        verify_bundle(moat, lic, clock=clock)


def test_clock_set_back_refused(vendor, machine, model, tmp_path):
    moat, lic, _ = bundle(vendor, model, tmp_path / "a", machine)
    clock = ManualClock()
    clock.advance(10 * 86400)  # the machine saw a later date ...
    verify_bundle(moat, lic, clock=clock)
    clock.set_wall(time.time() + 86400)  # ... then the clock is set back nine days
    with pytest.raises(VaultError, match="system clock is set back"):
        verify_bundle(moat, lic, clock=clock)
    clock.set_wall(time.time() + 10 * 86400 - 60)  # within tolerance (300 s) is fine
    assert verify_bundle(moat, lic, clock=clock)["ok"]


def test_clock_before_issue_refused(vendor, machine, model, tmp_path):
    moat, lic, _ = bundle(vendor, model, tmp_path / "a", machine, not_before=int(time.time()) - 86400 * 30)
    guard_path = ClockGuard(machine).path
    clock = ManualClock(time.time() - 86400 * 10)
    guard_path.unlink()
    ClockGuard(machine, clock).start_record()
    with pytest.raises(VaultError, match="before the license was issued"):
        verify_bundle(moat, lic, clock=clock)


def test_clock_record_tampered_or_deleted(vendor, machine, model, tmp_path):
    moat, lic, _ = bundle(vendor, model, tmp_path / "a", machine)
    guard = ClockGuard(machine)
    d = json.loads(guard.path.read_text())
    guard.path.write_text(json.dumps({"hwm": d["hwm"] - 10**6, "mac": d["mac"]}))
    with pytest.raises(VaultError, match="was altered"):
        verify_bundle(moat, lic)
    guard.path.unlink()
    with pytest.raises(VaultError, match="clock record .* is missing"):
        verify_bundle(moat, lic)


def test_other_model_and_other_customer(vendor, machine, model, tmp_path):
    moat_a, lic_a, _ = bundle(vendor, model, tmp_path / "a", machine, customer="acme")
    moat_b, lic_b, _ = bundle(vendor, model, tmp_path / "b", machine, customer="bolt")
    with pytest.raises(VaultError, match="license is for another model"):
        verify_bundle(moat_b, lic_a)
    # a second model sealed for the same customer
    moat_a2 = tmp_path / "a2.moat"
    vendor.seal(model, "acme", moat_a2)
    with pytest.raises(VaultError, match="license is for another model"):
        verify_bundle(moat_a2, lic_a)
    # a license whose signed customer differs from the sealed file's (the vendor refuses to issue one,
    # so build it with the library, as a buggy or forged issuer would)
    from codemoat.vault.container import SealedFile
    from codemoat.vault.license_issue import issue

    sealed = SealedFile(moat_a)
    doc = issue(
        vendor.signing_key,
        sealed=sealed,
        customer="bolt",
        customer_id=vendor.find_customer("bolt").id,
        machines=[machine.identity()],
        content_key=vendor.content_key(sealed.manifest.file_id),
        watermark_key=None,
        not_before=int(time.time()),
        expires=int(time.time()) + 999,
        issued_at=int(time.time()),
        features=["chat"],
    )
    bad = tmp_path / "bad.lic"
    bad.write_text(json.dumps(doc))
    with pytest.raises(VaultError, match="license is for customer 'bolt', but the model is sealed for 'acme'"):
        verify_bundle(moat_a, bad)
    with pytest.raises(VaultError, match="sealed for customer 'acme', not 'bolt'"):
        vendor.issue_license(customer="bolt", model=moat_a, machines=[machine.identity()], expires=int(time.time()) + 99)


def test_edited_field_breaks_signature(vendor, machine, model, tmp_path):
    moat, lic, doc = bundle(vendor, model, tmp_path / "a", machine)
    doc["license"]["expires"] += 86400 * 365
    lic.write_text(json.dumps(doc))
    with pytest.raises(VaultError, match="license: bad signature"):
        verify_bundle(moat, lic)


def test_other_vendor_refused(vendor, machine, model, tmp_path):
    moat, lic, _ = bundle(vendor, model, tmp_path / "a", machine)
    verify_bundle(moat, lic)  # pins this vendor's key on the machine
    other = Vendor.init(tmp_path / "other-vendor")
    moat2, lic2, _ = bundle(other, model, tmp_path / "b", machine)
    with pytest.raises(VaultError, match="which this machine does not trust"):
        verify_bundle(moat2, lic2)
    with pytest.raises(VaultError, match="come from different vendors"):
        verify_bundle(moat, lic2)
    other.close()


def test_identity_parsing(machine):
    ident = machine.identity()
    assert parse_identity(json.dumps(ident))["id"] == machine.id
    ident["x25519"] = MachineKey.generate().identity()["x25519"]
    with pytest.raises(VaultError, match="id does not match its keys"):
        parse_identity(ident)
    with pytest.raises(VaultError, match="neither a file nor JSON"):
        parse_identity("/no/such/file.json")


def test_machine_key_file_is_private(machine):
    mode = MachineKey.path().stat().st_mode & 0o777
    assert mode == 0o600
    MachineKey.path().chmod(0o644)
    with pytest.raises(VaultError, match="readable by other users"):
        MachineKey.load()


def _has_trace() -> bool:
    """Fingerprinting is another package's; when it exists, sealing with it is allowed to succeed."""
    import importlib.util

    return importlib.util.find_spec("codemoat.trace.fingerprint") is not None


def test_cli_flow_and_one_line_errors(tmp_path, model, gguf_file, vault_home):
    v = tmp_path / "v"
    assert cli("vendor", "init", "--vendor", str(v)).returncode == 0
    ident = cli("machine-id", "--json")
    assert ident.returncode == 0
    ident_file = tmp_path / "me.json"
    ident_file.write_text(ident.stdout)
    assert json.loads(ident.stdout)["kind"] == "codemoat-machine"
    p = cli(
        "vendor",
        "seal",
        str(gguf_file),  # a whole GGUF: `vendor seal` parses it (the magic and noise of `model` is refused)
        "--vendor",
        str(v),
        "--customer",
        "acme",
        "--out",
        str(tmp_path / "a.moat"),
        "--no-fingerprint",
    )
    assert p.returncode == 0, p.stderr
    p = cli(
        "vendor",
        "license",
        "issue",
        "--vendor",
        str(v),
        "--customer",
        "acme",
        "--model",
        str(tmp_path / "a.moat"),
        "--machine",
        str(ident_file),
        "--expires",
        "30d",
        "--out",
        str(tmp_path / "a.lic"),
        "--json",
    )
    assert p.returncode == 0, p.stderr
    lid = json.loads(p.stdout)["id"]
    p = cli("verify", "--model", str(tmp_path / "a.moat"), "--license", str(tmp_path / "a.lic"), "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["ok"] is True
    listed = json.loads(cli("vendor", "license", "list", "--vendor", str(v), "--json").stdout)
    assert [r["id"] for r in listed] == [lid] and listed[0]["state"] == "active"
    insp = json.loads(cli("inspect", str(tmp_path / "a.lic"), "--json").stdout)
    assert insp["id"] == lid and "keys" not in insp

    # failure classes: each one line, exit 1
    elsewhere = tmp_path / "elsewhere"
    assert "no identity yet" in one_line_error(
        cli("verify", "--model", str(tmp_path / "a.moat"), "--license", str(tmp_path / "a.lic"), home=elsewhere)
    )
    assert cli("machine-id", home=elsewhere).returncode == 0
    assert "another machine" in one_line_error(
        cli("verify", "--model", str(tmp_path / "a.moat"), "--license", str(tmp_path / "a.lic"), home=elsewhere)
    )
    raw = bytearray((tmp_path / "a.moat").read_bytes())
    raw[-5] ^= 1
    (tmp_path / "t.moat").write_bytes(raw)
    assert "failed authentication" in one_line_error(
        cli("verify", "--model", str(tmp_path / "t.moat"), "--license", str(tmp_path / "a.lic"))
    )
    (tmp_path / "s.moat").write_bytes(raw[:-100])
    assert "truncated" in one_line_error(cli("inspect", str(tmp_path / "s.moat")))
    flat = write_gguf(tmp_path / "flat.gguf", markable=False)  # no tensor a fingerprint marks
    assert (
        "--no-fingerprint"
        in one_line_error(
            cli("vendor", "seal", str(flat), "--vendor", str(v), "--customer", "acme", "--out", str(tmp_path / "x.moat"))
        )
        or _has_trace()
    )
    assert "no vendor keys" in one_line_error(
        cli("vendor", "unseal", str(tmp_path / "a.moat"), "--vendor", str(tmp_path / "nobody"), "--out", str(tmp_path / "x.gguf"))
    )
    other = tmp_path / "v2"
    assert cli("vendor", "init", "--vendor", str(other)).returncode == 0
    assert "not by this vendor" in one_line_error(
        cli("vendor", "unseal", str(tmp_path / "a.moat"), "--vendor", str(other), "--out", str(tmp_path / "x.gguf"))
    )
    assert not (tmp_path / "x.gguf").exists()
    assert cli("vendor", "license", "revoke", lid, "--vendor", str(v)).returncode == 0
    assert "no license" in one_line_error(cli("vendor", "license", "revoke", "lic_nope", "--vendor", str(v)))
