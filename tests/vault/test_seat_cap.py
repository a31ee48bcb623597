"""A per-machine seat cap on lease licenses (`lease.max_seats_per_machine`, signed by the vendor):
one licensed machine asking for more seats with made-up instance ids gets only its cap, and the
other licensed machines keep the seats they need; without a cap a machine may take them all."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from codemoat.errors import CodemoatError
from codemoat.vault.codec import VaultError
from codemoat.vault.keyserver import LeaseDenied
from codemoat.vault.lease import LeaseClient
from codemoat.vault.license import License
from codemoat.vault.machine import MachineKey
from vaulthelp import bundle


def _license(vendor, model, tmp_path, machines, url, **kw):
    _, lic, _ = bundle(vendor, model, tmp_path / "out", machines, mode="lease", keyserver=url, lease_ttl=600, **kw)
    return lic


def _per_machine(vendor, lid: str) -> dict[str, int]:
    with vendor.engine.connect() as c:
        q = sa.text("select machine_id, count(*) from vault_leases where license_id = :l group by machine_id")
        return dict(c.execute(q, {"l": lid}).all())


def _flood(lic, machine, n: int) -> tuple[list[LeaseClient], list[str]]:
    held, refused = [], []
    for _ in range(n):  # made-up instances, each with its own instance key, all from `machine`
        c = LeaseClient(lic, machine)
        try:
            c.acquire()
            held.append(c)
        except LeaseDenied as e:
            refused.append(e.code)
            c.close()
    return held, refused


def test_one_machine_flooding_made_up_instances_gets_only_its_cap(vendor, machine, model, tmp_path, keyserver):
    other = MachineKey.generate()
    lic = License.load(_license(vendor, model, tmp_path, [machine, other], keyserver.url, seats=5, max_seats_per_machine=2))
    assert lic.lease["max_seats_per_machine"] == 2
    held, refused = _flood(lic, machine, 6)
    assert len(held) == 2 and refused == ["machine_seats_exhausted"] * 4
    theirs, none = _flood(lic, other, 3)  # the other machine still finds its seats (one of 5 stays free)
    assert len(theirs) == 2 and none == ["machine_seats_exhausted"]
    assert _per_machine(vendor, lic.id) == {machine.id: 2, other.id: 2}
    assert held[0].acquire().seats_used == 4  # renewals of held seats are unaffected
    held[0].release()
    again, _ = _flood(lic, machine, 1)  # a freed seat on that machine can be taken again, by it
    assert len(again) == 1
    for c in held + theirs + again:
        c.close()


def test_the_refusal_says_why_in_one_line(vendor, machine, model, tmp_path, keyserver):
    lic = License.load(_license(vendor, model, tmp_path, [machine], keyserver.url, seats=3, max_seats_per_machine=1))
    held, _ = _flood(lic, machine, 1)
    with pytest.raises(LeaseDenied) as e:
        LeaseClient(lic, machine).acquire()
    assert e.value.code == "machine_seats_exhausted" and "\n" not in str(e.value)
    assert f"machine {machine.id} already holds 1 seats of license {lic.id}" in str(e.value)
    held[0].close()


def test_without_a_cap_one_machine_may_take_every_seat(vendor, machine, model, tmp_path, keyserver):
    lic = License.load(_license(vendor, model, tmp_path, [machine], keyserver.url, seats=3))
    assert "max_seats_per_machine" not in lic.lease
    held, refused = _flood(lic, machine, 4)
    assert len(held) == 3 and refused == ["seats_exhausted"]
    for c in held:
        c.close()


def test_a_cap_edited_into_the_license_breaks_its_signature(vendor, machine, model, tmp_path, keyserver):
    path = _license(vendor, model, tmp_path, [machine], keyserver.url, seats=3, max_seats_per_machine=1)
    doc = json.loads(path.read_text())
    doc["license"]["lease"]["max_seats_per_machine"] = 3  # the customer raises its own cap
    path.write_text(json.dumps(doc))
    with pytest.raises(VaultError):
        License.load(path)


@pytest.mark.parametrize("cap", [0, 4, -1])
def test_a_cap_outside_one_to_seats_is_refused_when_issuing(vendor, machine, model, tmp_path, cap):
    with pytest.raises(CodemoatError, match="max-seats-per-machine"):
        _license(vendor, model, tmp_path, [machine], "http://127.0.0.1:9", seats=3, max_seats_per_machine=cap)
