"""Fixtures for updates: a vendor, this machine, a licensed customer, and a helper that releases bundles."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DAY = 86400


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


class Shop:
    """The vendor's side of a test: a customer sealed and licensed, bundles released on demand."""

    def __init__(self, vendor, machine, gguf: Path, folder: Path):
        self.vendor, self.machine, self.gguf, self.folder = vendor, machine, gguf, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.moat = folder / "acme-v1.moat"
        vendor.seal(gguf, "acme", self.moat)
        self.last, self.last_customer = None, None

    def license(self, *, support_until: float | None = None, days: float = 30, machine=None, customer: str = "acme",
                name: str | None = None, **kw) -> Path:
        moat = self.moat
        self.last_customer = customer
        if customer != "acme":
            moat = self.folder / f"{customer}.moat"
            if not moat.exists():
                self.vendor.seal(self.gguf, customer, moat)
        doc = self.vendor.issue_license(
            customer=customer, model=moat, machines=[(machine or self.machine).identity()],
            expires=int(time.time() + days * DAY), support_until=None if support_until is None else int(support_until), **kw)
        self.last = doc["license"]["id"]  # releases take this license's machines and terms
        p = self.folder / (name or f"{doc['license']['id']}.lic")
        p.write_text(json.dumps(doc))
        return p

    def release(self, version: str, kind: str = "model", source: Path | None = None, customer: str = "acme",
                **kw) -> Path:
        from codemoat.updates.release import release

        out = self.folder / f"{customer}-{kind}-{version}-{time.monotonic_ns()}.moatpkg"
        kw.setdefault("license_id", self.last if customer == self.last_customer else None)
        release(self.vendor, customer=customer, kind=kind, source=source or self.gguf, version=version, out=out, **kw)
        return out


@pytest.fixture
def shop(vendor, machine, gguf_file, tmp_path):
    return Shop(vendor, machine, gguf_file, tmp_path / "shop")


@pytest.fixture
def store(machine):
    from codemoat.updates.store import UpdateStore

    records: list[tuple[str, dict]] = []
    s = UpdateStore(machine=machine, audit=lambda step, d: records.append((step, d)))
    s.records = records
    return s
