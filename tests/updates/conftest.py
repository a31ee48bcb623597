"""Fixtures for updates: a vendor, this machine, a licensed customer, and a helper that releases bundles."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))  # updhelp: this folder is a package, not on the path by itself

from updhelp import Shop  # noqa: E402


@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory) -> Path:
    from tinymodel import build_tiny_gguf

    return build_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture
def vendor(tmp_path):
    from codemoat.vault.vendor import Vendor

    v = Vendor.init(tmp_path / "vendor")
    yield v
    v.close()


@pytest.fixture
def machine(home):
    from codemoat.vault.machine import MachineKey

    return MachineKey.load_or_create()


@pytest.fixture
def shop(vendor, machine, gguf_file, tmp_path):
    return Shop(vendor, machine, gguf_file, tmp_path / "shop")


@pytest.fixture
def store(machine, request):
    from codemoat.updates.store import UpdateStore

    records: list[tuple[str, dict]] = []
    # the model this machine serves (as `model.path` would name it): adapter bundles are for its base
    models = [request.getfixturevalue("shop").moat] if "shop" in request.fixturenames else []
    s = UpdateStore(machine=machine, audit=lambda step, d: records.append((step, d)), models=models)
    s.records = records
    return s
