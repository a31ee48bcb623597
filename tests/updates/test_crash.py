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
