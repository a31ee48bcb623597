"""`codemoat vendor release` and `codemoat update …` as a user runs them: one-line errors, JSON reports."""

from __future__ import annotations

import json

from updhelp import one_line_error, run_cli


def _issue(shop, ident, support_until: str, out, *more: str):
    """`vendor license issue` of a year's license for acme on `ident`'s machine, support until `support_until`."""
    vdir, model = str(shop.vendor.root), str(shop.moat)
    args = ("--machine", str(ident), "--expires", "365d", "--support-until", support_until, "--out", str(out), *more)
    return run_cli("vendor", "license", "issue", "--vendor", vdir, "--customer", "acme", "--model", model, *args)


def _release(shop, out, *args: str, customer: str = "acme"):
    """`vendor release` for `customer`, written to `out`, with `args` (the payload, the version, ...)."""
    return run_cli("vendor", "release", "--vendor", str(shop.vendor.root), "--customer", customer, *args, "--out", str(out))


def test_release_apply_refuse_renew_downgrade(shop, tmp_path):
    ident = tmp_path / "m.json"
    ident.write_text(json.dumps(shop.machine.identity()))
    lic = tmp_path / "lapsed.lic"
    r = _issue(shop, ident, "2026-01-01", lic, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["support_until_iso"].startswith("2026-01-01")
    v2 = tmp_path / "v2.moatpkg"
    r = _release(shop, v2, "--model", str(shop.gguf), "--version", "2", "--no-fingerprint", "--notes", "better", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == "2"
    line = one_line_error(run_cli("update", "apply", str(v2), "--license", str(lic)))
    assert "after your support ended on 2026-01-01" in line
    renewed = tmp_path / "renewed.lic"
    r = _issue(shop, ident, "365d", renewed)
    assert r.returncode == 0, r.stderr
    assert run_cli("update", "verify", str(v2), "--license", str(renewed)).returncode == 0
    r = run_cli("update", "apply", str(v2), "--license", str(renewed), "--json")
    assert r.returncode == 0, r.stderr
    v1 = tmp_path / "v1.moatpkg"
    assert _release(shop, v1, "--model", str(shop.gguf), "--version", "1", "--no-fingerprint").returncode == 0
    assert "not newer than the installed 2" in one_line_error(run_cli("update", "apply", str(v1)))
    rows = json.loads(run_cli("update", "list", "--json").stdout)
    assert [(r["version"], r["current"], r["notes"]) for r in rows] == [("2", True, "better")]
    audit = run_cli("audit", "export", "--kind", "update")
    steps = [json.loads(line)["route"] for line in audit.stdout.splitlines() if line.strip()]
    assert steps == ["update refused", "update verified", "update apply_started", "update applied", "update refused"]


def test_bad_input_is_one_line(shop, tmp_path):
    junk = tmp_path / "junk.moatpkg"
    junk.write_bytes(b"not a bundle at all")
    assert "bad magic" in one_line_error(run_cli("update", "verify", str(junk), "--license", str(shop.license())))
    assert "no license recorded" in one_line_error(run_cli("update", "apply", str(shop.release("1"))))
    assert "not found" in one_line_error(run_cli("update", "verify", str(tmp_path / "nope"), "--license", str(shop.license())))
    assert "nothing to roll back" in one_line_error(run_cli("update", "rollback"))
    x = tmp_path / "x.moatpkg"
    one_line_error(_release(shop, x, "--version", "2"))  # no payload given
    assert "not a version" in one_line_error(_release(shop, x, "--model", str(shop.gguf), "--version", "two"))
    line = one_line_error(_release(shop, x, "--model", str(shop.gguf), "--version", "2", customer="nobody"))
    assert "no customer named" in line


def test_release_does_not_replace_a_bundle_without_force(shop, tmp_path):
    """`vendor release --out` over an existing file refuses in one line naming it and --force, before anything
    is sealed or recorded (it replaced the file silently, while `seal` and `license issue` refuse); with --force
    the file is the new bundle."""
    shop.license()
    out = tmp_path / "acme-2.moatpkg"
    r = _release(shop, out, "--model", str(shop.gguf), "--version", "2", "--no-fingerprint", "--json")
    assert r.returncode == 0, r.stderr
    first = out.read_bytes()
    line = one_line_error(_release(shop, out, "--model", str(shop.gguf), "--version", "3", "--no-fingerprint"))
    assert f"{out} exists: pass --force to replace it" in line
    assert out.read_bytes() == first
    r = _release(shop, out, "--model", str(shop.gguf), "--version", "3", "--no-fingerprint", "--force", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == "3" and out.read_bytes() != first
    # replaces: the last release recorded, 2 (the refused 3 recorded nothing)
    assert json.loads(r.stdout)["replaces"] == "2"
