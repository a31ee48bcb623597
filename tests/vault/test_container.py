"""The sealed container: round trips, and every kind of damage rejected with a named error."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from codemoat.engines.memfd import MemfdBuffer
from codemoat.vault.codec import VaultError
from codemoat.vault.container import PREFIX, TAG_LEN, SealedFile, content_key_id
from codemoat.vault.sealer import seal_bytes

CHUNK = 4096


def make(tmp_path, data: bytes, key: bytes | None = None, signer=None, name="m.moat", **manifest):
    """`data` sealed for acme into tmp_path / name (`manifest` sets more of its fields); the file and its key."""
    key = key or os.urandom(32)
    signer = signer or Ed25519PrivateKey.generate()
    sealed = seal_bytes(
        data,
        tmp_path / name,
        signing_key=signer,
        content_key=key,
        model_id="m",
        fmt="gguf",
        customer="acme",
        customer_id="c_1",
        chunk_size=CHUNK,
        **manifest,
    )
    return sealed, key


def test_aesgcm_nist_vector():
    # NIST GCM test vector (gcmEncryptExtIV256.rsp, Count 0, 256-bit key, 96-bit IV, empty PT, empty AAD).
    key = bytes.fromhex("b52c505a37d78eda5dd34f20c22540ea1b58963cf8e5bf8ffa85f9f2492505b4")
    iv = bytes.fromhex("516c33929df5a3284ff463d7")
    assert AESGCM(key).encrypt(iv, b"", b"").hex() == "bdc1ac884d332457a1d2664f168c76f0"


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17])
def test_round_trip_sizes(tmp_path, size):
    data = os.urandom(size)
    sealed, key = make(tmp_path, data)
    reopened = SealedFile(sealed.path)
    assert reopened.manifest.plaintext_sha256 == hashlib.sha256(data).hexdigest()
    assert bytes(reopened.decrypt(key)) == data
    assert reopened.file_size == reopened.payload_offset + size + TAG_LEN * reopened.n_chunks


def test_decrypt_into_sealed_memfd(tmp_path):
    data = os.urandom(5 * CHUNK + 3)
    sealed, key = make(tmp_path, data)
    buf = MemfdBuffer(len(data))
    try:
        sealed.decrypt_into(key, buf.view)
        buf.seal()
        with open(buf.path, "rb") as f:
            assert f.read() == data
        with open(buf.path, "r+b", buffering=0) as f, pytest.raises(PermissionError):
            f.write(b"x")  # F_SEAL_FUTURE_WRITE: no write() and no new writable mapping
    finally:
        buf.close()


def test_ciphertext_hides_plaintext(tmp_path):
    data = b"CANARY-0123456789abcdef" * 2000
    sealed, _ = make(tmp_path, data)
    raw = sealed.path.read_bytes()
    assert b"CANARY-0123456789" not in raw


def test_wrong_key_refused_before_decrypting(tmp_path):
    sealed, _ = make(tmp_path, os.urandom(CHUNK * 2))
    with pytest.raises(VaultError, match="key id differs"):
        sealed.decrypt(os.urandom(32))


def _chunk_offsets(s: SealedFile) -> list[tuple[int, int]]:
    out, pos = [], s.payload_offset
    for i in range(s.n_chunks):
        size = min(CHUNK, s.manifest.plaintext_size - i * CHUNK) + TAG_LEN
        out.append((pos, size))
        pos += size
    return out


def test_tampered_chunk_named(tmp_path):
    sealed, key = make(tmp_path, os.urandom(CHUNK * 3))
    raw = bytearray(sealed.path.read_bytes())
    off, _ = _chunk_offsets(sealed)[1]
    raw[off + 100] ^= 0x01
    sealed.path.write_bytes(raw)
    with pytest.raises(VaultError, match="chunk 1 of 3 failed authentication"):
        SealedFile(sealed.path).decrypt(key)


def test_swapped_chunks_rejected(tmp_path):
    sealed, key = make(tmp_path, os.urandom(CHUNK * 3))
    raw = bytearray(sealed.path.read_bytes())
    (a, n), (b, _), _ = _chunk_offsets(sealed)
    raw[a : a + n], raw[b : b + n] = raw[b : b + n], raw[a : a + n]
    sealed.path.write_bytes(raw)
    with pytest.raises(VaultError, match="chunk 0 of 3 failed authentication"):
        SealedFile(sealed.path).decrypt(key)


def test_last_chunk_cannot_pose_as_middle(tmp_path):
    # Dropping the final chunk and fixing the size in the manifest is impossible (signed); even with the
    # signer's key, a non-final chunk re-labelled final fails: the final flag is in nonce and AAD.
    signer = Ed25519PrivateKey.generate()
    key = os.urandom(32)
    data = os.urandom(CHUNK * 2)
    full, _ = make(tmp_path, data, key, signer, "full.moat")
    short, _ = make(
        tmp_path, data[:CHUNK], key, signer, "short.moat", file_id=full.manifest.file_id, created=full.manifest.created
    )
    raw_full = full.path.read_bytes()
    raw_short = bytearray(short.path.read_bytes())
    off, n = _chunk_offsets(full)[0]
    raw_short[short.payload_offset :] = raw_full[off : off + n]
    short.path.write_bytes(raw_short)
    with pytest.raises(VaultError, match="chunk 0 of 1 failed authentication"):
        SealedFile(short.path).decrypt(key)


def test_truncated_and_extended(tmp_path):
    sealed, key = make(tmp_path, os.urandom(CHUNK * 2))
    raw = sealed.path.read_bytes()
    sealed.path.write_bytes(raw[:-1])
    with pytest.raises(VaultError, match="truncated"):
        SealedFile(sealed.path)
    sealed.path.write_bytes(raw + b"\x00")
    with pytest.raises(VaultError, match="trailing"):
        SealedFile(sealed.path)
    sealed.path.write_bytes(raw[:30])
    with pytest.raises(VaultError, match="truncated"):
        SealedFile(sealed.path)


def test_manifest_edit_breaks_signature(tmp_path):
    sealed, _ = make(tmp_path, os.urandom(CHUNK))
    raw = sealed.path.read_bytes()
    edited = raw.replace(b'"customer":"acme"', b'"customer":"acmf"')
    assert edited != raw
    sealed.path.write_bytes(edited)
    with pytest.raises(VaultError, match="bad signature"):
        SealedFile(sealed.path)


def test_resigned_manifest_still_bound_to_chunks(tmp_path):
    # An attacker with their own signing key re-signs an edited manifest: the header hash changes,
    # so every chunk's associated data differs and the first chunk fails.
    sealed, key = make(tmp_path, os.urandom(CHUNK * 2))
    raw = sealed.path.read_bytes()
    _, _, mlen = PREFIX.unpack(raw[: PREFIX.size])
    other = Ed25519PrivateKey.generate()
    import json

    from codemoat.vault.codec import b64e, canonical, public_raw, sign

    fields = json.loads(raw[PREFIX.size : PREFIX.size + mlen])
    fields["customer"] = "evil"
    fields["vendor_key"] = b64e(public_raw(other.public_key()))
    manifest = canonical(fields)
    signed = PREFIX.pack(b"CODEMOAT", 1, len(manifest)) + manifest
    rebuilt = signed + sign(other, b"codemoat-manifest-v1", signed) + raw[PREFIX.size + mlen + 64 :]
    sealed.path.write_bytes(rebuilt)
    with pytest.raises(VaultError, match="chunk 0 of 2 failed authentication"):
        SealedFile(sealed.path).decrypt(key)


def test_bad_magic_and_version(tmp_path):
    sealed, _ = make(tmp_path, os.urandom(10))
    raw = bytearray(sealed.path.read_bytes())
    bad = bytes(raw)
    sealed.path.write_bytes(b"GGUF" + bad[4:])
    with pytest.raises(VaultError, match="bad magic"):
        SealedFile(sealed.path)
    raw[8:10] = struct.pack(">H", 2)
    sealed.path.write_bytes(raw)
    with pytest.raises(VaultError, match="version 2 is not supported"):
        SealedFile(sealed.path)


def test_key_id_is_a_commitment():
    k = os.urandom(32)
    assert content_key_id(k) == content_key_id(bytes(k))
    assert content_key_id(k) != content_key_id(os.urandom(32))


def test_decrypt_to_pwrite_into_memfd(tmp_path):
    data = os.urandom(3 * CHUNK + 5)
    sealed, key = make(tmp_path, data)
    buf = MemfdBuffer(len(data))
    try:
        sealed.decrypt_to(key, lambda off, chunk: os.pwrite(buf.fd, chunk, off), check_sha256=True)
        assert bytes(buf.view) == data
    finally:
        buf.close()
    raw = bytearray(sealed.path.read_bytes())
    raw[-1] ^= 1
    sealed.path.write_bytes(raw)
    got: list[int] = []
    with pytest.raises(VaultError, match="chunk 3 of 4 failed authentication"):
        SealedFile(sealed.path).decrypt_to(key, lambda off, chunk: got.append(off), threads=1)
    assert got == [0, CHUNK, 2 * CHUNK]  # earlier chunks were handed over; the caller discards them


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_parallel_decryption_is_the_same_plaintext(tmp_path, threads):
    data = os.urandom(23 * CHUNK + 11)
    sealed, key = make(tmp_path, data)
    out = bytearray(len(data))
    sealed.decrypt_into(key, memoryview(out), check_sha256=True, threads=threads)
    assert out == data
    buf = MemfdBuffer(len(data), hugepages=False)
    try:
        sealed.decrypt_to(key, buf.write_at, threads=threads)
        assert bytes(buf.view) == data
    finally:
        buf.close()


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_parallel_decryption_names_the_altered_chunk(tmp_path, threads):
    data = os.urandom(16 * CHUNK)
    sealed, key = make(tmp_path, data)
    raw = bytearray(sealed.path.read_bytes())
    raw[sealed.payload_offset + 9 * (CHUNK + TAG_LEN) + 100] ^= 0x40  # inside chunk 9
    sealed.path.write_bytes(raw)
    with pytest.raises(VaultError, match="chunk 9 of 16 failed authentication"):
        SealedFile(sealed.path).decrypt_into(key, memoryview(bytearray(len(data))), threads=threads)
    with pytest.raises(VaultError, match="chunk 9 of 16 failed authentication"):
        SealedFile(sealed.path).decrypt_to(key, lambda off, chunk: None, threads=threads)


def test_parallel_decryption_rejects_when_any_range_fails(tmp_path):
    data = os.urandom(16 * CHUNK)
    sealed, key = make(tmp_path, data)
    raw = bytearray(sealed.path.read_bytes())
    for i in (2, 13):  # one in each half
        raw[sealed.payload_offset + i * (CHUNK + TAG_LEN)] ^= 1
    sealed.path.write_bytes(raw)
    with pytest.raises(VaultError, match=r"chunk (2|13) of 16 failed authentication"):
        SealedFile(sealed.path).decrypt_into(key, memoryview(bytearray(len(data))), threads=2)


def test_a_failing_writer_error_reaches_the_caller(tmp_path):
    data = os.urandom(16 * CHUNK)
    sealed, key = make(tmp_path, data)
    calls: list[int] = []

    def write(off, chunk):
        calls.append(off)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        sealed.decrypt_to(key, write, threads=4)
    assert 1 <= len(calls) <= 4  # each worker stops at its first failed write, none goes on


def test_reading_a_sealed_file_keeps_only_chunks_in_flight_resident(tmp_path):
    """Decrypting chunk by chunk (verify, the memfd load) drops each chunk's ciphertext pages once
    done: peak RSS grows by a few chunks, not by the file (a 3 GB verify peaked at 2.9 GB)."""
    import subprocess
    import sys

    data = os.urandom(1 << 20) * 160  # 160 MiB of plaintext
    sealed, key = make(tmp_path, data, name="big.moat")
    (tmp_path / "key").write_bytes(key)
    # VmHWM, not ru_maxrss: the latter carries the forking parent's peak across exec
    code = (
        "import re; from codemoat.vault.container import SealedFile; "
        "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
        f"sf = SealedFile({str(sealed.path)!r}); base = hwm(); "
        f"sf.decrypt_to(open({str(tmp_path / 'key')!r}, 'rb').read(), lambda off, b: None); "
        "print(hwm() - base)"
    )
    grown_kib = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown_kib < 48 * 1024, f"peak RSS grew by {grown_kib // 1024} MiB reading a 160 MiB sealed file"


def test_sealing_never_writes_through_a_link_planted_in_the_output_folder(tmp_path):
    """Whoever can write in the folder of `vendor seal`'s or `tune --out`'s output plants a symbolic link where
    the sealer used to write its temporary file (`m.moat.part`), and one at the output's own name: the files they
    name are left as they were, and the sealed file is a new regular file."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"the admin's file\n")
    (tmp_path / "m.moat.part").symlink_to(victim)
    (tmp_path / "m.moat").symlink_to(tmp_path / "other.txt")
    sealed, key = make(tmp_path, b"weights" * 1000)
    assert victim.read_bytes() == b"the admin's file\n" and not (tmp_path / "other.txt").exists()
    assert not (tmp_path / "m.moat").is_symlink() and (tmp_path / "m.moat").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part") and not p.is_symlink()] == []
    assert bytes(SealedFile(tmp_path / "m.moat").decrypt(key)) == b"weights" * 1000
