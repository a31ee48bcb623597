"""A crash at any step of `update apply` leaves the previous version serving and the store consistent."""

from __future__ import annotations

import json

import pytest

from codemoat.updates.store import STEPS, UpdateStore
from updhelp import run_cli


def _consistent(store: UpdateStore) -> None:
    """Every bundle the state names is complete on disk, and nothing else is there."""
    s = store.state()
    named = {b for ch in s["channels"].values() for b in [ch["current"], *ch.get("history", [])] if b}
    on_disk = {p.name for p in (store.root / "bundles").iterdir()} if (store.root / "bundles").exists() else set()
    assert on_disk == named
    for b in named:
        assert (store.root / "bundles" / b / "manifest.json").is_file()
    assert not list((store.root / "staging").glob("*")) if (store.root / "staging").exists() else True
    assert not (store.root / "state.json.tmp").exists()


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_each_step(shop, machine, step):
    lic = shop.license()
    store = UpdateStore(machine=machine)
    first = shop.release("1", kind="knowledge-pack", source=_pack(shop), name="docs")
    store.apply(first, lic)
    second = shop.release("2", kind="knowledge-pack", source=_pack(shop, "v2"), name="docs")
    r = run_cli("update", "apply", str(second), env={"CODEMOAT_UPDATE_CRASH_AT": step})
    assert r.returncode == 86, (r.returncode, r.stderr)  # killed at that step, no cleanup ran
    listed = run_cli("update", "list", "--json")  # the next run reconciles first
    assert listed.returncode == 0, listed.stderr
    current = [row["version"] for row in json.loads(listed.stdout) if row["current"]]
    switched = STEPS.index(step) >= STEPS.index("switched")
    assert current == (["2"] if switched else ["1"])
    _consistent(store)
    from codemoat.updates.packs import indexed_root

    assert indexed_root("docs").startswith(f"pack:docs@{current[0]}#")  # the index serves what the state says
    if not switched:
        assert store.apply(second)["version"] == "2"  # and the interrupted install can simply be run again
        _consistent(store)


def test_a_crash_is_recorded_as_recovered_and_a_rollback_is_not(shop, store):
    """`recovered` means a crash was repaired: a rollback's (or an apply's) own tidying is named in its
    own record, and the next run after a real crash still records the repair."""
    lic = shop.license()
    first = shop.release("1", kind="knowledge-pack", source=_pack(shop), name="docs")
    second = shop.release("2", kind="knowledge-pack", source=_pack(shop, "v2"), name="docs")
    store.apply(first, lic)
    v2 = store.apply(second)["bundle_id"]
    store.records.clear()
    assert store.rollback()["version"] == "1"
    assert [step for step, _ in store.records] == ["rolled_back"]  # was: recovered, then rolled_back
    assert f"removed bundle {v2} no state names" in store.records[0][1]["tidied"]
    _consistent(store)

    r = run_cli("update", "apply", str(second), env={"CODEMOAT_UPDATE_CRASH_AT": "staged"})
    assert r.returncode == 86, (r.returncode, r.stderr)
    store.records.clear()
    assert [row["version"] for row in store.list() if row["current"]] == ["1"]  # list reconciles first
    assert store.records == [("recovered", {"actions": [f"removed unfinished install {v2}"]})]
    _consistent(store)


def test_crash_hook_is_inert_outside_tests(shop, machine):
    lic = shop.license()
    b = shop.release("1")
    r = run_cli(
        "update", "apply", str(b), "--license", str(lic), env={"CODEMOAT_UPDATE_CRASH_AT": "staged", "PYTEST_CURRENT_TEST": ""}
    )
    assert r.returncode == 0, r.stderr


def _pack(shop, text: str = "v1"):
    folder = shop.folder / f"pack-{text}"
    folder.mkdir(exist_ok=True)
    (folder / "guide.md").write_text(f"# Guide {text}\n\nCall `frobnicate()` to frob.\n")
    (folder / "frob.py").write_text(f"def frobnicate():\n    '''{text}'''\n    return 1\n")
    return folder
