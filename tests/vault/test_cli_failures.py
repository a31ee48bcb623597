"""Every offline failure class through the real CLI: one line on stderr, exit 1, no traceback."""

from __future__ import annotations

import json
import os
import time

import pytest

from codemoat.vault.clock import ClockGuard
from vaulthelp import bundle, cli, one_line_error


@pytest.fixture
def setup(vendor, machine, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + os.urandom(30_000))
    moat, lic, doc = bundle(vendor, model, tmp_path / "a", machine)
    return vendor, machine, model, moat, lic, doc, tmp_path


def verify(moat, lic):
    return cli("verify", "--model", str(moat), "--license", str(lic))


def test_cli_issue_then_expired_and_not_yet_valid(setup):
    vendor, machine, model, moat, lic, doc, tmp = setup
    ident = tmp / "me.json"
    ident.write_text(json.dumps(machine.identity()))
    base = ["vendor", "license", "issue", "--vendor", str(vendor.root), "--customer", "acme", "--model", str(moat),
            "--machine", str(ident)]
    p = cli(*base, "--not-before", "2019-01-01", "--expires", "2020-01-01", "--out", str(tmp / "old.lic"))
    assert p.returncode == 0, p.stderr
    assert "license expired on 2020-01-01" in one_line_error(verify(moat, tmp / "old.lic"))
    p = cli(*base, "--not-before", "2d", "--expires", "30d", "--out", str(tmp / "future.lic"))
    assert p.returncode == 0, p.stderr
    assert "license is not valid until" in one_line_error(verify(moat, tmp / "future.lic"))
    assert "expiry must come after its start" in one_line_error(
        cli(*base, "--not-before", "2030-01-01", "--expires", "2029-01-01"))
    assert "unknown feature" in one_line_error(cli(*base, "--expires", "30d", "--features", "complete,root"))
    assert "--mode must be" in one_line_error(cli(*base, "--expires", "30d", "--mode", "cloud"))
    assert "needs --keyserver" in one_line_error(cli(*base, "--expires", "30d", "--mode", "lease"))
    assert "machine identity" in one_line_error(
        cli(*base[:-1], '{"kind": "something-else"}', "--expires", "30d"))


def test_cli_signature_model_customer_clock(setup):
    vendor, machine, model, moat, lic, doc, tmp = setup
    edited = json.loads(lic.read_text())
    edited["license"]["features"] = ["complete", "chat", "index", "admin"]
    (tmp / "edited.lic").write_text(json.dumps(edited))
    assert "license: bad signature" in one_line_error(verify(moat, tmp / "edited.lic"))
    moat_b, lic_b, _ = bundle(vendor, model, tmp / "b", machine, customer="bolt")
    assert "license is for another model" in one_line_error(verify(moat_b, lic))
    assert "is sealed for customer 'acme', not 'bolt'" in one_line_error(
        cli("vendor", "license", "issue", "--vendor", str(vendor.root), "--customer", "bolt", "--model", str(moat),
            "--machine", json.dumps(machine.identity()), "--expires", "30d"))
    # The machine once saw a date a year ahead (its authenticated clock record says so): today is "set back".
    guard = ClockGuard(machine)
    guard._write(int(time.time()) + 365 * 86400)
    assert "system clock is set back" in one_line_error(verify(moat, lic))
    guard.path.write_text(json.dumps({"hwm": 1, "mac": "00"}))
    assert "was altered" in one_line_error(verify(moat, lic))
    assert "not a codemoat sealed file" in one_line_error(verify(lic, lic))
    assert "license is not valid JSON" in one_line_error(verify(moat, moat))
    assert "sealed file not found" in one_line_error(verify(tmp / "nope.moat", lic))
