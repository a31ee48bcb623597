"""A crash between the state's switch and the license's rename (store._apply, f5407f3): the next run finishes the
install with the license it switched to, instead of dropping that license and serving the new version under the
one before (which may not cover it). A crash before the switch still keeps the license before (the negative)."""

from __future__ import annotations

import json

from updhelp import run_cli


def _crash_apply(bundle, lic, step: str) -> None:
    r = run_cli("update", "apply", str(bundle), "--license", str(lic), env={"CODEMOAT_UPDATE_CRASH_AT": step})
    assert r.returncode == 86, (r.returncode, r.stdout, r.stderr)  # killed there, no cleanup ran


def _current() -> list[str]:
    listed = run_cli("update", "list", "--json")  # the next run reconciles first
    assert listed.returncode == 0, listed.stderr
    return [row["version"] for row in json.loads(listed.stdout) if row["current"]]


def test_a_crash_after_the_switch_installs_the_license_it_switched_to(shop, store):
    lic1 = shop.license()
    store.apply(shop.release("1"), lic1)
    lic2 = shop.license(days=60)
    bundle = shop.release("2")
    assert lic2.read_bytes() != store.license_path.read_bytes()
    _crash_apply(bundle, lic2, "license_pending")
    assert (store.root / "license.lic.tmp").exists()
    assert _current() == ["2"]
    assert store.license_path.read_bytes() == lic2.read_bytes()
    assert not (store.root / "license.lic.tmp").exists()
    assert store.reconcile() == []


def test_a_crash_before_the_switch_keeps_the_license_before(shop, store):
    lic1 = shop.license()
    store.apply(shop.release("1"), lic1)
    before = store.license_path.read_bytes()
    lic2 = shop.license(days=60)
    bundle = shop.release("2")
    _crash_apply(bundle, lic2, "journaled")
    assert (store.root / "license.lic.tmp").exists()
    assert _current() == ["1"]
    assert store.license_path.read_bytes() == before
    assert not (store.root / "license.lic.tmp").exists()
