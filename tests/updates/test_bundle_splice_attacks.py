"""Attacker's tests on model bundles since their payload is authenticated by itself (03f1457, e758907):
the license in the vendor-signed manifest must grant the sealed model it carries, on this machine.

A customer holds several genuine bundles (its older releases, another customer's from a shared
mirror): each payload below is a genuine sealed model of the same size, spliced under another genuine
signed manifest, so no size or signature check can notice; only the license's binding to the sealed
file's signed header stops it, with a license that wraps the key (GCM path) and under a lease (digest
path). A crash at any step of a model apply leaves a model that opens under its own license. And the
`verified` audit record names the release's version, not the bundle's format number.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError
from codemoat.updates import bundle as fmt
from codemoat.updates.store import STEPS, UpdateStore
from updhelp import run_cli


def _splice(header_of: Path, payload_of: Path, out: Path) -> Path:
    """`header_of`'s signed header (its manifest and signature, untouched) with `payload_of`'s payload."""
    h, p = fmt.Bundle(header_of), fmt.Bundle(payload_of)
    assert h.manifest["payload"]["size"] == p.manifest["payload"]["size"]  # same size: only the binding can tell
    out.write_bytes(header_of.read_bytes()[: h.payload_offset] + b"".join(p.pieces()))
    fmt.Bundle(out)  # the signature and the size still hold
    return out


def _refused(store, path: Path, lic: Path) -> None:
    for act in (store.verify, store.apply):
        with pytest.raises(CodemoatError, match="sealed model in the update bundle is refused: license is for another model"):
            act(path, lic)
    staging = store.root / "staging"
    assert not staging.exists() or not any(staging.iterdir())


@pytest.mark.parametrize("mode", ["offline", "lease"])
def test_an_older_release_spliced_under_a_newer_signed_manifest_is_refused(shop, store, tmp_path, mode):
    kw = {} if mode == "offline" else dict(mode="lease", keyserver="http://127.0.0.1:9", lease_ttl=60, grace=60)
    lic = shop.license(**kw)
    old, new = shop.release("1"), shop.release("2")
    store.apply(old, lic)
    _refused(store, _splice(new, old, tmp_path / "spliced.moatpkg"), lic)
    assert [r["version"] for r in store.list() if r["current"]] == ["1"]
    assert store.apply(new, lic)["version"] == "2"  # the genuine v2 installs


def test_another_customers_model_spliced_under_this_customers_manifest_is_refused(shop, store, tmp_path):
    lic = shop.license()
    mine = shop.release("2")
    shop.license(customer="beta")  # the same machine licensed to another customer (a name as long: the same size)
    theirs = shop.release("2", customer="beta")
    _refused(store, _splice(mine, theirs, tmp_path / "spliced.moatpkg"), lic)
    assert store.list() == []


def test_verify_audits_the_release_version_not_the_bundle_format(shop, store):
    lic = shop.license()
    store.verify(shop.release("7"), lic)
    [(step, detail)] = store.records
    assert step == "verified" and detail["version"] == "7"  # was 2: the bundle format's number


@pytest.mark.parametrize("step", [s for s in STEPS if s != "indexed"])
def test_a_crash_at_each_step_of_a_model_apply_leaves_a_model_that_opens(shop, machine, step):
    from codemoat.vault.clock import ClockGuard
    from codemoat.vault.container import SealedFile
    from codemoat.vault.license import License, check

    lic = shop.license()
    store = UpdateStore(machine=machine)
    store.apply(shop.release("1"), lic)
    r = run_cli("update", "apply", str(shop.release("2")), env={"CODEMOAT_UPDATE_CRASH_AT": step})
    assert r.returncode == 86, (r.returncode, r.stderr)  # killed at that step, no clean-up ran
    listed = run_cli("update", "list", "--json")  # the next run reconciles first
    assert listed.returncode == 0, listed.stderr
    [row] = [x for x in json.loads(listed.stdout) if x["current"]]
    assert row["version"] == ("2" if STEPS.index(step) >= STEPS.index("switched") else "1")
    sealed = SealedFile(row["model"])
    grant = check(License.load(row["license"]), sealed, machine, ClockGuard(machine))
    sealed.decrypt_to(grant.content_key, lambda lo, out: None)  # every chunk's tag holds
    assert not any((store.root / "staging").glob("*")) if (store.root / "staging").exists() else True
