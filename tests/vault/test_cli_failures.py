"""Every offline failure class through the real CLI: one line on stderr, exit 1, no traceback."""

from __future__ import annotations

import json
import time

import pytest

from codemoat.vault.clock import ClockGuard
from ggufs import write_gguf
from vaulthelp import bundle, cli, one_line_error


@pytest.fixture
def setup(vendor, machine, tmp_path):
    model = tmp_path / "m.gguf"
    write_gguf(model, 30_000)
    moat, lic, doc = bundle(vendor, model, tmp_path / "a", machine)
    return vendor, machine, model, moat, lic, doc, tmp_path


def verify(moat, lic):
    return cli("verify", "--model", str(moat), "--license", str(lic))


def issue(vendor, moat, customer="acme"):
    """`vendor license issue` of `moat` for `customer`: the arguments every test here starts with."""
    return ["vendor", "license", "issue", "--vendor", str(vendor.root), "--customer", customer, "--model", str(moat)]


def test_cli_issue_then_expired_and_not_yet_valid(setup):
    vendor, machine, model, moat, lic, doc, tmp = setup
    ident = tmp / "me.json"
    ident.write_text(json.dumps(machine.identity()))
    base = [*issue(vendor, moat), "--machine", str(ident)]
    p = cli(*base, "--not-before", "2019-01-01", "--expires", "2020-01-01", "--out", str(tmp / "old.lic"))
    assert p.returncode == 0, p.stderr
    assert "license expired on 2020-01-01" in one_line_error(verify(moat, tmp / "old.lic"))
    p = cli(*base, "--not-before", "2d", "--expires", "30d", "--out", str(tmp / "future.lic"))
    assert p.returncode == 0, p.stderr
    assert "license is not valid until" in one_line_error(verify(moat, tmp / "future.lic"))
    assert "expiry must come after its start" in one_line_error(
        cli(*base, "--not-before", "2030-01-01", "--expires", "2029-01-01")
    )
    assert "unknown feature" in one_line_error(cli(*base, "--expires", "30d", "--features", "complete,root"))
    assert "--mode must be" in one_line_error(cli(*base, "--expires", "30d", "--mode", "cloud"))
    assert "needs --keyserver" in one_line_error(cli(*base, "--expires", "30d", "--mode", "lease"))
    assert "machine identity" in one_line_error(cli(*base[:-1], '{"kind": "something-else"}', "--expires", "30d"))


def test_cli_signature_model_customer_clock(setup):
    vendor, machine, model, moat, lic, doc, tmp = setup
    edited = json.loads(lic.read_text())
    edited["license"]["features"] = ["complete", "chat", "index", "admin"]
    (tmp / "edited.lic").write_text(json.dumps(edited))
    assert "license: bad signature" in one_line_error(verify(moat, tmp / "edited.lic"))
    moat_b, lic_b, _ = bundle(vendor, model, tmp / "b", machine, customer="bolt")
    assert "license is for another model" in one_line_error(verify(moat_b, lic))
    assert "is sealed for customer 'acme', not 'bolt'" in one_line_error(
        cli(*issue(vendor, moat, "bolt"), "--machine", json.dumps(machine.identity()), "--expires", "30d")
    )
    # The machine once saw a date a year ahead (its authenticated clock record says so): today is "set back".
    guard = ClockGuard(machine)
    guard._write(int(time.time()) + 365 * 86400)
    assert "system clock is set back" in one_line_error(verify(moat, lic))
    guard.path.write_text(json.dumps({"hwm": 1, "mac": "00"}))
    assert "was altered" in one_line_error(verify(moat, lic))
    assert "not a codemoat sealed file" in one_line_error(verify(lic, lic))
    assert "license is not valid JSON" in one_line_error(verify(moat, moat))
    assert "sealed file not found" in one_line_error(verify(tmp / "nope.moat", lic))


def test_cli_unseal_does_not_replace_a_file_without_force(setup):
    """`vendor unseal --out` over an existing file refuses in one line naming it and --force (as `seal` and
    `license issue` do); the file is left as it was; with --force it is replaced by the plaintext."""
    vendor, machine, model, moat, lic, doc, tmp = setup
    out = tmp / "plain.gguf"
    out.write_bytes(b"the vendor's notes, not a model")
    args = ["vendor", "unseal", str(moat), "--vendor", str(vendor.root), "--out", str(out)]
    assert f"{out} exists: pass --force to replace it" in one_line_error(cli(*args))
    assert out.read_bytes() == b"the vendor's notes, not a model"
    p = cli(*args, "--force")
    assert p.returncode == 0, p.stderr
    sealed, key = vendor.open_sealed(moat)
    assert out.read_bytes() == bytes(sealed.decrypt(key))
    fresh = tmp / "fresh" / "plain.gguf"  # a new path (and its folder) needs no --force
    assert cli("vendor", "unseal", str(moat), "--vendor", str(vendor.root), "--out", str(fresh)).returncode == 0
    assert fresh.read_bytes() == out.read_bytes()


def test_cli_wrong_kinds_of_path_are_one_line(setup):
    """Folders, non-text files and odd paths where the vault expects something else: one line naming it."""
    vendor, machine, model, moat, lic, doc, tmp = setup
    folder = tmp / "adir"
    folder.mkdir()
    assert f"{folder} is a folder, not a sealed file" in one_line_error(verify(folder, lic))
    assert "is a folder, not a sealed file" in one_line_error(
        cli("vendor", "unseal", str(folder), "--vendor", str(vendor.root), "--out", str(tmp / "x.gguf"))
    )
    # unseal into a folder where a .gguf file is meant: refused before anything is decrypted or written
    assert f"{folder} is a folder: name the .gguf file" in one_line_error(
        cli("vendor", "unseal", str(moat), "--vendor", str(vendor.root), "--out", str(folder))
    )
    assert list(folder.iterdir()) == []
    # a machine identity that is not text, or is a folder
    binary = tmp / "id.bin"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    base = [*issue(vendor, moat), "--expires", "30d", "--machine"]
    assert "is not text (not UTF-8)" in one_line_error(cli(*base, str(binary)))
    assert "is a folder: name the identity file" in one_line_error(cli(*base, str(folder)))
    # vendor init on a file, and under a path that cannot exist
    a_file = tmp / "plain.txt"
    a_file.write_text("keep me")
    assert "is a file: --vendor names a folder" in one_line_error(cli("vendor", "init", "--vendor", str(a_file)))
    assert a_file.read_text() == "keep me"
    assert "cannot create vendor folder" in one_line_error(cli("vendor", "init", "--vendor", str(a_file / "sub")))


def test_license_times_stay_printable(vendor, machine, tmp_path):
    """The vault itself refuses times no date can show (not only the CLI's parser), and describing a
    license with a damaged time field shows the number instead of failing."""
    from codemoat.errors import CodemoatError
    from codemoat.durations import LATEST
    from codemoat.vault.clock import iso

    model = tmp_path / "m.gguf"
    write_gguf(model, 3000)
    moat = tmp_path / "m.moat"
    vendor.seal(model, "acme", moat)
    for expires in (LATEST + 1, -5):
        with pytest.raises(CodemoatError, match="outside the years 1970-9999"):
            vendor.issue_license(customer="acme", model=moat, machines=[machine.identity()], expires=expires)
    assert vendor.licenses() == []
    doc = vendor.issue_license(customer="acme", model=moat, machines=[machine.identity()], expires=LATEST)
    assert iso(LATEST) == "9999-12-31T23:59:59Z" and doc["license"]["expires"] == LATEST
    assert iso(10**20).endswith("(out of range)")


def test_cli_outputs_are_not_overwritten_and_licenses_can_be_exported_again(setup):
    """An issued license file or a sealed file is never replaced silently; the vendor database can
    write any license out again, byte for byte the document that was issued."""
    vendor, machine, model, moat, lic, doc, tmp = setup
    out = tmp / "acme.lic"
    base = [*issue(vendor, moat), "--machine", json.dumps(machine.identity()), "--expires", "30d", "--out", str(out)]
    assert cli(*base).returncode == 0
    first = out.read_text()
    err = one_line_error(cli(*base))
    assert f"{out} exists: pass --force" in err and "vendor license show" in err
    assert out.read_text() == first
    assert len(vendor.licenses()) == 2  # the one issued with the fixture, and this one: the refusal recorded none
    assert cli(*base, "--force").returncode == 0
    assert out.read_text() != first and len(vendor.licenses()) == 3
    first_id = json.loads(first)["license"]["id"]
    again = tmp / "again.lic"
    p = cli("vendor", "license", "show", first_id, "--vendor", str(vendor.root), "--out", str(again), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["id"] == first_id and again.read_text() == first
    p = cli("vendor", "license", "show", first_id, "--vendor", str(vendor.root))
    assert p.returncode == 0 and p.stdout == first
    assert cli("verify", "--model", str(moat), "--license", str(again)).returncode == 0
    assert "no license lic_nope" in one_line_error(cli("vendor", "license", "show", "lic_nope", "--vendor", str(vendor.root)))
    # sealing over an existing sealed file
    before = moat.read_bytes()
    assert f"{moat} exists: pass --force" in one_line_error(
        cli(
            "vendor",
            "seal",
            str(model),
            "--vendor",
            str(vendor.root),
            "--customer",
            "acme",
            "--out",
            str(moat),
            "--no-fingerprint",
        )
    )
    assert moat.read_bytes() == before
