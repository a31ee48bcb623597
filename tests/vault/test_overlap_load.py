"""`vault.overlap_load`: a sealed GGUF decrypted while llama.cpp reads it (engines.overlap) serves what the
plain sealed load serves, fails on a chunk that fails authentication, and when llama.cpp reads ahead of
the decryption the load is redone after a full one (never served from unauthenticated or missing bytes)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from codemoat.config import load_settings
from codemoat.engines import overlap
from codemoat.engines.base import SamplingParams
from codemoat.engines.memfd import F_SEAL_GROW, F_SEAL_SHRINK, F_SEAL_FUTURE_WRITE
from codemoat.engines.sealed import open_sealed
from codemoat.vault.codec import VaultError
from codemoat.vault.container import TAG_LEN, SealedFile
from vaulthelp import bundle

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
CHUNK = 4096  # the smallest the format allows: the tiny model is ~60 chunks


def settings(overlap_load: str = "read"):
    return load_settings(
        **{
            "model.n_ctx": 256,
            "model.n_threads": 1,
            "model.isolation": "inline",
            "model.parallel": 1,
            "vault.overlap_load": overlap_load,
        }
    )


def complete(holder) -> str:
    return asyncio.run(holder.get().complete("def add(a, b):\n", GREEDY)).text


def plain_answer(moat, lic) -> str:
    """The answer of the same sealed model loaded the default way (decrypt, then map)."""
    plain = open_sealed(moat, lic, settings=settings("off"), watch=False)
    try:
        return complete(plain)
    finally:
        plain.close()


def start_late(monkeypatch, seconds: float) -> None:
    """The decrypting threads begin `seconds` late (llama.cpp has started loading by then)."""
    work = overlap.FillingBuffer._work

    def late(self):
        time.sleep(seconds)
        work(self)

    monkeypatch.setattr(overlap.FillingBuffer, "_work", late)


@pytest.fixture
def sealed(vendor, machine, gguf_file, tmp_path):
    moat, lic, _ = bundle(vendor, gguf_file, tmp_path / "out", machine, chunk_size=CHUNK)
    return moat, lic


@pytest.fixture
def buffers(monkeypatch):
    """Every FillingBuffer made, to look at after the load."""
    made: list[overlap.FillingBuffer] = []
    init = overlap.FillingBuffer.__init__

    def record(self, *a, **kw):
        made.append(self)
        init(self, *a, **kw)

    monkeypatch.setattr(overlap.FillingBuffer, "__init__", record)
    return made


def test_overlapped_load_serves_what_the_sealed_load_serves(sealed, buffers):
    moat, lic = sealed
    expected = plain_answer(moat, lic)
    assert not buffers
    holder = open_sealed(moat, lic, settings=settings(), watch=False)
    try:
        (buf,) = buffers
        assert buf.outcome == "overlap" and buf.mode == "read", buf.reason
        assert SealedFile(moat).n_chunks > 40 and len(buf.plan.order) == buf.n_chunks
        assert complete(holder) == expected
        # sealed before the engine was handed out: no resize, no new write
        need = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE
        assert buf.seals() & need == need and holder.get()._memfd is buf
        with pytest.raises(OSError):
            os.pwrite(buf.fd, b"x", 0)
    finally:
        holder.close()
    assert buf.fd == -1  # zeroed and closed with the engine


@pytest.mark.parametrize("huge", [False, True])
def test_auto_maps_while_the_memfd_gets_4k_pages_and_decrypts_first_with_huge_pages(sealed, buffers, monkeypatch, huge):
    """The default ("auto"): map where the kernel gives memory files 4 KiB pages (faster or equal there,
    bench/results/vault.md), decrypt-then-map where it allows 2 MiB pages (map was slower there)."""
    from codemoat.engines import memfd

    moat, lic = sealed
    monkeypatch.setattr(memfd, "huge_pages_allowed", lambda: huge)
    assert load_settings().vault.overlap_load == "auto"
    holder = open_sealed(moat, lic, settings=settings("auto"), watch=False)
    try:
        assert [b.mode for b in buffers] == ([] if huge else ["map"])
        assert complete(holder) and holder.get()._memfd.sealed
    finally:
        holder.close()


def test_a_chunk_failing_authentication_fails_the_overlapped_load(sealed, buffers, monkeypatch):
    """A byte flipped in the last chunk: the load that llama.cpp has begun is aborted, nothing is
    served, the memfd is zeroed and closed."""
    moat, lic = sealed
    sf = SealedFile(moat)
    last = sf.payload_offset + (sf.n_chunks - 1) * (CHUNK + TAG_LEN) + 10
    data = bytearray(moat.read_bytes())
    data[last] ^= 0x01
    moat.write_bytes(bytes(data))
    calls: list[float] = []
    gate = overlap.FillingBuffer.gate

    def counting(self):
        cb = gate(self)

        @__import__("llama_cpp").llama_progress_callback
        def wrapped(progress, user):
            calls.append(progress)
            if len(calls) == 1:
                time.sleep(0.2)  # llama.cpp has begun: let the decryptor reach the last chunk meanwhile
            return cb(progress, user)

        self._keep = wrapped
        return wrapped

    monkeypatch.setattr(overlap.FillingBuffer, "gate", counting)
    with pytest.raises(VaultError, match=f"chunk {sf.n_chunks - 1} of {sf.n_chunks} failed authentication"):
        open_sealed(moat, lic, settings=settings(), watch=False)
    (buf,) = buffers
    assert calls and buf.fd == -1 and buf.outcome == ""


def test_a_flipped_header_byte_fails_before_llama_reads_anything(sealed, buffers):
    moat, lic = sealed
    sf = SealedFile(moat)
    data = bytearray(moat.read_bytes())
    data[sf.payload_offset + 100] ^= 0x01
    moat.write_bytes(bytes(data))
    with pytest.raises(VaultError, match=f"chunk 0 of {sf.n_chunks} failed authentication"):
        open_sealed(moat, lic, settings=settings(), watch=False)


def test_llama_reading_ahead_of_the_decryption_is_caught(sealed, buffers, monkeypatch):
    """A plan that does not hold (here: the gate never waits and the decryptor starts late, so
    llama.cpp reads chunks not yet written): the fdinfo check sees it, the load is redone after a full
    decryption and serves the right model. Without the check the same load serves other weights."""
    moat, lic = sealed
    expected = plain_answer(moat, lic)
    monkeypatch.setattr(overlap._Plan, "need", lambda self, loaded: 0)
    start_late(monkeypatch, 1.0)
    holder = open_sealed(moat, lic, settings=settings(), watch=False)
    try:
        assert buffers[-1].outcome == "fallback" and "ahead of the decryption" in buffers[-1].reason
        assert complete(holder) == expected
    finally:
        holder.close()
    monkeypatch.setattr(overlap.FillingBuffer, "_read_was_safe", lambda self, pos, span, snapshot: True)
    holder = open_sealed(moat, lic, settings=settings(), watch=False)
    try:
        assert buffers[-1].outcome == "overlap" and complete(holder) != expected
    finally:
        holder.close()


def test_a_descriptor_that_never_moves_is_not_taken_for_llamas(sealed, buffers, monkeypatch):
    """Only descriptors that stay at offset 0 (such as the one our own mmap keeps) in view: nothing shows
    what llama.cpp read, so the overlapped load is not trusted and is redone after a full decryption."""
    moat, lic = sealed
    expected = plain_answer(moat, lic)
    dups: list[int] = []

    def ours_only(self):
        dups.append(os.dup(self.fd))  # shares our description: pwrite never moves its offset
        return dups[-1:]

    monkeypatch.setattr(overlap.FillingBuffer, "_other_fds", ours_only)
    holder = open_sealed(moat, lic, settings=settings(), watch=False)
    try:
        assert buffers[-1].outcome == "fallback" and "file position" in buffers[-1].reason
        assert complete(holder) == expected
    finally:
        holder.close()
        for fd in dups:
            os.close(fd)


def test_map_mode_waits_for_the_whole_file_before_any_weight(sealed, buffers, monkeypatch):
    """ "map": llama.cpp maps the memfd and parses its header while the rest is decrypted; the decryptor
    starts late here, so the first progress callback has to wait for it, and the answer is the same."""
    moat, lic = sealed
    expected = plain_answer(moat, lic)
    start_late(monkeypatch, 0.5)
    holder = open_sealed(moat, lic, settings=settings("map"), watch=False)
    try:
        (buf,) = buffers
        assert buf.mode == "map" and buf.outcome == "overlap" and buf.gate_wait_s > 0.2
        assert complete(holder) == expected and holder.get()._memfd is buf and buf.sealed
    finally:
        holder.close()
    sf = SealedFile(moat)
    data = bytearray(moat.read_bytes())
    data[sf.payload_offset + (sf.n_chunks - 1) * (CHUNK + TAG_LEN) + 10] ^= 0x01
    moat.write_bytes(bytes(data))
    with pytest.raises(VaultError, match=f"chunk {sf.n_chunks - 1} of {sf.n_chunks} failed authentication"):
        open_sealed(moat, lic, settings=settings("map"), watch=False)
    assert buffers[-1].fd == -1


def test_gguf_table_refuses_a_short_header(gguf_file):
    data = gguf_file.read_bytes()
    base, table = overlap.gguf_table(data)
    assert table[0][0] == "token_embd.weight" and table[0][1] == base
    assert sum(size for _, _, size in table) <= len(data) - base
    with pytest.raises(ValueError):
        overlap.gguf_table(data[: base // 2])
