"""`seal_stream` reads a model twice (to hash it for the signed header, then to encrypt it): a file that changes
between the reads is refused, not sealed under a SHA-256 that no load of it can match; one that does not is sealed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from codemoat.vault.codec import VaultError
from codemoat.vault.container import SealedFile
from codemoat.vault.sealer import seal_stream


def _seal(tmp_path: Path, model: Path, change_after_first_read: bytes | None):
    reads = []

    def pieces():
        reads.append(1)
        with open(model, "rb") as f:
            while block := f.read(1000):
                yield block
        if change_after_first_read is not None and len(reads) == 1:  # the vendor's file, rewritten meanwhile
            model.write_bytes(change_after_first_read)

    key = os.urandom(32)
    (tmp_path / "out").mkdir(exist_ok=True)
    out = tmp_path / "out" / "m.moat"
    sealed = seal_stream(
        pieces,
        model.stat().st_size,
        out,
        signing_key=Ed25519PrivateKey.generate(),
        content_key=key,
        model_id="m",
        fmt="gguf",
        customer="acme",
        customer_id="c_1",
        chunk_size=4096,
    )
    return sealed, key, reads


def test_a_model_that_changes_between_the_two_reads_is_refused_and_nothing_is_written(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + os.urandom(9996))
    other = b"GGUF" + os.urandom(9996)  # the same size: only the bytes differ
    with pytest.raises(VaultError, match="changed while it was sealed"):
        _seal(tmp_path, model, other)
    assert list((tmp_path / "out").iterdir()) == []  # no .moat, no part file


def test_a_model_read_twice_unchanged_is_sealed_and_opens(tmp_path):
    model = tmp_path / "model.gguf"
    data = b"GGUF" + os.urandom(9996)
    model.write_bytes(data)
    sealed, key, reads = _seal(tmp_path, model, None)
    assert len(reads) == 2
    assert bytes(SealedFile(sealed.path).decrypt(key)) == data
