"""Sealed adapters open only on the machine that tuned them, and only unchanged."""

from __future__ import annotations

import pytest

from codemoat.errors import CodemoatError
from codemoat.engines.adapters import Adapter, open_adapter, seal_adapter
from codemoat.vault.machine import MachineKey


def _adapter() -> Adapter:
    meta = {"name": "pay", "repos": [{"name": "payments", "groups": ["payments"]}], "base": {"sha256": "ab" * 32}}
    return Adapter(meta, b"GGUF" + bytes(range(256)) * 4, b"ST" * 100, '{"r": 4}')


def test_round_trip_on_this_machine(tmp_path):
    out = seal_adapter(_adapter(), tmp_path / "a.moat")
    got = open_adapter(out)
    assert got.meta == _adapter().meta and got.gguf == _adapter().gguf and got.safetensors == _adapter().safetensors
    assert got.repos == ["payments"]
    assert b"GGUF" not in out.read_bytes()  # encrypted at rest


def test_another_machine_cannot_open_it(tmp_path):
    out = seal_adapter(_adapter(), tmp_path / "a.moat")
    with pytest.raises(CodemoatError, match="not sealed on this machine"):
        open_adapter(out, machine=MachineKey.generate(facts={}))


@pytest.mark.parametrize("where", [20, -1, -40])
def test_any_changed_byte_is_refused(tmp_path, where):
    out = seal_adapter(_adapter(), tmp_path / "a.moat")
    data = bytearray(out.read_bytes())
    data[where] ^= 1
    out.write_bytes(bytes(data))
    with pytest.raises(CodemoatError):
        open_adapter(out)


def test_truncated_is_refused(tmp_path):
    out = seal_adapter(_adapter(), tmp_path / "a.moat")
    out.write_bytes(out.read_bytes()[:-10])
    with pytest.raises(CodemoatError, match="truncated"):
        open_adapter(out)


def test_a_file_signed_by_another_machine_is_refused(tmp_path):
    """Someone who re-seals an adapter with their own key (and wraps it to ours) is still refused."""
    other = MachineKey.generate(facts={})
    out = seal_adapter(_adapter(), tmp_path / "a.moat", machine=other)
    with pytest.raises(CodemoatError, match="not sealed on this machine"):
        open_adapter(out, machine=MachineKey.load_or_create())
