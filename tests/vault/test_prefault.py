"""A sealed start allocates its memfd while the key is unwrapped (engines.memfd.Prefault): the buffer
handed to the engine is that one, holds exactly the plaintext, and a refused start leaves none behind."""

from __future__ import annotations

import os
import time

import pytest

from codemoat.engines import sealed as sealed_mod
from codemoat.engines.memfd import huge_pages_allowed
from codemoat.engines.sealed import open_sealed
from codemoat.vault.codec import VaultError
from ggufs import write_gguf
from vaulthelp import bundle


class _Held:  # what the holder "serves": the decrypted buffer itself (as tune/base.py does)
    in_flight = 0

    def __init__(self, buf) -> None:
        self.buf = buf

    def close(self) -> None:
        self.buf.close(zero=True)


def _memfds() -> dict[int, int]:
    """inode -> bytes allocated, for this process's codemoat memfds (a mapping holds a second fd of each)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:codemoat-"):
                st = os.stat(f"/proc/self/fd/{name}")
                out[st.st_ino] = st.st_blocks * 512
        except OSError:
            continue
    return out


def _model(tmp_path, size: int = 6 << 20) -> tuple:
    model = tmp_path / "m.gguf"
    write_gguf(model, size)
    return model, model.read_bytes()


@pytest.mark.skipif(huge_pages_allowed(), reason="with 2 MiB shmem pages nothing is allocated ahead")
def test_the_memfd_is_allocated_while_the_key_is_unwrapped(vendor, machine, tmp_path, monkeypatch):
    model, plain = _model(tmp_path)
    moat, lic, _ = bundle(vendor, model, tmp_path / "out", machine)
    seen: list[dict[int, int]] = []
    real_check = sealed_mod.check

    def slow_check(*a, **kw):  # a TPM's unwrap takes a while: the buffer is made meanwhile
        end = time.monotonic() + 30
        while time.monotonic() < end and not any(n >= len(plain) for n in _memfds().values()):
            time.sleep(0.005)
        seen.append(_memfds())
        return real_check(*a, **kw)

    monkeypatch.setattr(sealed_mod, "check", slow_check)
    before = set(_memfds())
    holder = open_sealed(moat, lic, watch=False, build=lambda _s, buf, _id, _parts: _Held(buf))
    try:
        buf = holder.get().buf
        early = {fd for fd, n in seen[0].items() if n >= len(plain)} - before
        assert early == {os.fstat(buf.fd).st_ino}  # the engine got the buffer allocated during the check
        assert buf.sealed and bytes(buf.view) == plain
    finally:
        holder.close()
    assert set(_memfds()) == before


def test_a_refused_start_leaves_no_memfd_behind(vendor, machine, tmp_path):
    model, _ = _model(tmp_path, 1 << 20)
    moat, lic, doc = bundle(vendor, model, tmp_path / "out", machine)
    before = set(_memfds())
    forged = tmp_path / "forged.lic"
    forged.write_text(lic.read_text().replace('"features": [', '"features": ["admin", ', 1))
    with pytest.raises(VaultError):
        open_sealed(moat, forged, watch=False, build=lambda _s, buf, _id, _parts: _Held(buf))
    raw = bytearray(moat.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    bad = tmp_path / "bad.moat"
    bad.write_bytes(raw)
    with pytest.raises(VaultError, match="failed authentication"):
        open_sealed(bad, lic, watch=False, build=lambda _s, buf, _id, _parts: _Held(buf))
    assert set(_memfds()) == before
