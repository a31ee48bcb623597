"""Offline licenses sealed to a TPM (a real swtpm per test): another chip, an extended PCR, reprovisioning."""

from __future__ import annotations

import json
import shutil

import pytest

from attest.swtpm_fixture import *  # noqa: F403  (the swtpm fixtures; tests/ is on the path)
from attest.tpmhelp import tpm_machine

from codemoat.attest.tpm import TAMPER_PCR
from codemoat.vault.codec import VaultError
from codemoat.vault.machine import TCTI_ENV, MachineKey, parse_identity
from codemoat.vault.verify import verify_bundle

try:  # tests/vault as a package, or as a plain folder on sys.path
    from .vaulthelp import bundle, cli, one_line_error
except ImportError:
    from vaulthelp import bundle, cli, one_line_error


def test_offline_license_binds_to_the_tpm_and_opens_there(vendor, model, tmp_path, swtpm):
    machine = tpm_machine(swtpm, vendor)
    moat, lic, doc = bundle(vendor, model, tmp_path / "out", machine)
    entry = doc["license"]["machines"][0]
    assert entry["binding"] == "tpm" and entry["tpm"]["ak"] == machine.tpm["identity"]["ak"]
    assert doc["license"]["keys"]["content_key"]["alg"] == "P256-HKDF-SHA256-A256GCM"
    assert verify_bundle(moat, lic)["ok"]


def test_a_machine_without_tpm_keeps_software_binding(vendor, machine, model, tmp_path):
    _, lic, doc = bundle(vendor, model, tmp_path / "out", machine)
    assert doc["license"]["machines"][0]["binding"] == "software"
    assert doc["license"]["keys"]["content_key"]["alg"].startswith("X25519")


def test_copied_home_on_another_tpm_is_refused(vendor, model, tmp_path, swtpm_factory, vault_home, monkeypatch):
    one, two = swtpm_factory(), swtpm_factory()
    tpm_machine(one, vendor)
    moat, lic, _ = bundle(vendor, model, tmp_path / "out", MachineKey.load())
    copy = tmp_path / "copied-home"
    shutil.copytree(vault_home, copy)  # machine.key, tpm.json, clock record: everything a file copy takes
    monkeypatch.setenv("CODEMOAT_HOME", str(copy))
    monkeypatch.setenv(TCTI_ENV, two.tcti)
    with pytest.raises(VaultError, match="license is sealed to another TPM"):
        verify_bundle(moat, lic)
    monkeypatch.setenv(TCTI_ENV, one.tcti)  # the same copy on the right chip opens: the chip is what matters
    assert verify_bundle(moat, lic)["ok"]


def test_software_key_alone_cannot_open_a_tpm_license(vendor, model, tmp_path, swtpm, vault_home):
    tpm_machine(swtpm, vendor)
    moat, lic, doc = bundle(vendor, model, tmp_path / "out", MachineKey.load())
    from codemoat.vault.codec import unwrap
    from codemoat.vault.license import key_context

    with pytest.raises(VaultError, match="unknown key wrapping"):
        unwrap(
            MachineKey.load().x25519,
            doc["license"]["keys"]["content_key"],
            key_context("content-key", doc["license"]["id"]),
            "content key",
        )
    (vault_home / "tpm.json").unlink()  # the TPM settings gone: one clear line, not a wrong key
    with pytest.raises(VaultError, match="bound to a TPM, but this machine has none set up"):
        verify_bundle(moat, lic)


def test_tamper_event_locks_and_reprovision_unlocks(vendor, model, tmp_path, swtpm, monkeypatch):
    monkeypatch.setenv(TCTI_ENV, swtpm.tcti)
    p = cli("machine-id", "--tpm", "--tcti", swtpm.tcti, "--json")
    assert p.returncode == 0, p.stderr
    ident = json.loads(p.stdout)
    assert ident["tpm"]["policy"]["pcrs"] == [TAMPER_PCR] and ident["tpm"]["ek_cert"]
    # provisioning: the vendor checks the EK certificate, the chip activates the credential, the AK is bound
    ca_pem, ch, act = tmp_path / "ek-ca.pem", tmp_path / "challenge.json", tmp_path / "activation.json"
    ca_pem.write_bytes((swtpm.ca / "issuercert.pem").read_bytes() + (swtpm.ca / "swtpm-localca-rootca-cert.pem").read_bytes())
    for args in (
        ("vendor", "tpm", "trust-ca", str(ca_pem), "--vendor", str(vendor.root)),
        ("vendor", "tpm", "challenge", "--vendor", str(vendor.root), "--machine", json.dumps(ident), "--out", str(ch)),
        ("appliance", "tpm-activate", str(ch), "--out", str(act)),
        ("vendor", "tpm", "confirm", str(act), "--vendor", str(vendor.root)),
    ):
        p = cli(*args)
        assert p.returncode == 0, p.stderr
    moat, lic, doc = bundle(vendor, model, tmp_path / "out", MachineKey.load())
    p = cli("verify", "--model", str(moat), "--license", str(lic))
    assert p.returncode == 0, p.stderr

    p = cli("appliance", "tamper-event", "--reason", "chassis opened", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["pcr"] == TAMPER_PCR
    line = one_line_error(cli("verify", "--model", str(moat), "--license", str(lic)))
    assert "tamper latch has counted a tamper event" in line  # the NV latch (it outlives a reboot; PCR 15 does not)
    p = cli("audit", "export", "--kind", "tamper")
    assert p.returncode == 0 and "chassis opened" in p.stdout, p.stdout + p.stderr

    # the vendor reprovisions with the same chip's new policy; another chip's identity is refused
    p = cli("machine-id", "--tpm", "--tcti", swtpm.tcti, "--json")
    fresh = json.loads(p.stdout)
    assert fresh["tpm"]["policy"]["digest"] != ident["tpm"]["policy"]["digest"]
    assert fresh["tpm"]["ak"] == ident["tpm"]["ak"]
    vdir = str(vendor.root)
    forged = dict(fresh, tpm=dict(fresh["tpm"], ak=ident["tpm"]["unwrap"]))  # another key posing as the AK
    lid = doc["license"]["id"]
    line = one_line_error(
        cli(
            "vendor",
            "license",
            "reprovision",
            lid,
            "--vendor",
            vdir,
            "--machine",
            json.dumps(forged),
            "--out",
            str(tmp_path / "bad.lic"),
        )
    )
    assert "not the one registered" in line
    new = tmp_path / "new.lic"
    p = cli("vendor", "license", "reprovision", lid, "--vendor", vdir, "--machine", json.dumps(fresh), "--out", str(new))
    assert p.returncode == 0, p.stderr
    assert cli("verify", "--model", str(moat), "--license", str(new)).returncode == 0
    assert "tamper latch" in one_line_error(cli("verify", "--model", str(moat), "--license", str(lic)))


def test_identity_tpm_block_is_checked(swtpm):
    ident = tpm_machine(swtpm).identity()
    assert parse_identity(ident)["tpm"]["ak"] == ident["tpm"]["ak"]
    for bad in (
        {"ak": "00"},
        {"unwrap": ident["ed25519"]},
        {"policy": {"bank": "sha1", "pcrs": [15], "digest": "0" * 64}},
        {"policy": {"bank": "sha256", "pcrs": [99], "digest": "0" * 64}},
        {"kind": "sev"},
    ):
        with pytest.raises(VaultError):
            parse_identity(dict(ident, tpm=dict(ident["tpm"], **bad)))


def test_unreachable_tpm_is_one_line(vendor, model, tmp_path, swtpm, free_port):
    assert "cannot reach the TPM" in one_line_error(
        cli("machine-id", "--tpm", "--tcti", f"swtpm:host=127.0.0.1,port={free_port}")
    )
    assert "tamper PCR" in one_line_error(cli("machine-id", "--tpm", "--tcti", swtpm.tcti, "--pcrs", "7"))


def test_machine_id_uses_the_tpm_when_the_setting_and_the_device_allow(swtpm, tmp_path, monkeypatch):
    device = tmp_path / "tpmrm0"  # stands in for /dev/tpmrm0: the chip itself is reached through the TCTI below
    device.write_text("")
    monkeypatch.setenv("CODEMOAT_TPM_TCTI", swtpm.tcti)
    monkeypatch.setenv("CODEMOAT_VAULT__TPM_DEVICE", str(device))

    def ident(setting: str, *flags: str, present: bool = True) -> dict:
        monkeypatch.setenv("CODEMOAT_HOME", str(tmp_path / f"home-{setting}-{present}-{len(flags)}"))
        monkeypatch.setenv("CODEMOAT_VAULT__TPM_DEVICE", str(device if present else tmp_path / "absent"))
        monkeypatch.setenv("CODEMOAT_VAULT__TPM", setting)
        p = cli("machine-id", "--json", *flags)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    assert "tpm" in ident("auto")
    assert "tpm" not in ident("auto", present=False)
    assert "tpm" not in ident("off")
    assert "tpm" not in ident("auto", "--no-tpm")
    assert "tpm" in ident("off", "--tpm")
