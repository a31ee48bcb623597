"""Fixtures for updates: a vendor, this machine, a licensed customer, and a helper that releases bundles."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))  # updhelp: this folder is a package, not on the path by itself

from updhelp import Shop  # noqa: E402


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
