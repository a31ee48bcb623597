"""Random damage to sealed files and licenses: every one of ≥ 10,000 mutations is refused cleanly.

"Cleanly" means a `VaultError` (one line, what failed) and nothing else: no other exception type,
no acceptance. Payloads are small so the whole run takes seconds; the checks are the real ones.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time

from codemoat.vault.clock import ClockGuard
from codemoat.vault.codec import VaultError
from codemoat.vault.container import TAG_LEN, SealedFile
from codemoat.vault.license import License, check
from ggufs import write_gguf

CHUNK = 4096
N_CONTAINER = 6000
N_LICENSE = 4500


class MemFile:
    """A path (/proc/self/fd/N of a memfd) whose content is replaced in place: fast, and on no disk."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("fuzz")
        self.path = f"/proc/self/fd/{self.fd}"

    def write_bytes(self, data: bytes | bytearray) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def close(self) -> None:
        os.close(self.fd)


def _expect_refused(fn, what: str, counts: dict[str, int]) -> None:
    try:
        fn()
    except VaultError as e:
        msg = str(e)
        assert msg and "\n" not in msg, (what, msg)
        counts[msg.split(":")[0][:40]] = counts.get(msg.split(":")[0][:40], 0) + 1
        return
    raise AssertionError(f"mutation accepted: {what}")


def test_container_mutations_all_rejected(vendor, tmp_path):
    model = tmp_path / "m.gguf"
    write_gguf(model, 3 * CHUNK + 777)
    sealed = vendor.seal(model, "acme", tmp_path / "a.moat", chunk_size=CHUNK)
    key = vendor.content_key(sealed.manifest.file_id)
    orig = sealed.path.read_bytes()
    assert bytes(SealedFile(sealed.path).decrypt(key)) == model.read_bytes()
    rng = random.Random(1234)
    target = MemFile()
    offsets = []
    pos = sealed.payload_offset
    for i in range(sealed.n_chunks):
        n = min(CHUNK, sealed.manifest.plaintext_size - i * CHUNK) + TAG_LEN
        offsets.append((pos, n))
        pos += n
    counts: dict[str, int] = {}
    kinds: dict[str, int] = {}
    for _ in range(N_CONTAINER):
        data = bytearray(orig)
        kind = rng.choice(["flip", "flip", "flip", "header_flip", "truncate", "extend", "swap", "drop", "dup"])
        if kind == "flip":
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == "header_flip":
            data[rng.randrange(sealed.payload_offset)] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            del data[rng.randrange(len(data)) :]
        elif kind == "extend":
            data += os.urandom(rng.randint(1, 64))
        elif kind == "swap":
            (a, n), (b, m) = rng.sample(offsets[:-1], 2)  # equal-sized full chunks
            data[a : a + n], data[b : b + m] = orig[b : b + m], orig[a : a + n]
        elif kind == "drop":
            a, n = rng.choice(offsets)
            del data[a : a + n]
        else:  # duplicate a chunk at its neighbour's place
            (a, n) = offsets[rng.randrange(len(offsets) - 2)]
            b = a + n
            data[b : b + n] = orig[a : a + n]
        if bytes(data) == orig:
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
        target.write_bytes(data)

        def attempt() -> None:
            SealedFile(target.path).decrypt(key, check_sha256=True)

        _expect_refused(attempt, kind, counts)
    target.close()
    assert sum(kinds.values()) >= N_CONTAINER - 5
    assert len(kinds) == 7
    assert any("failed authentication" in k for k in counts) or any(k.startswith("chunk") for k in counts)


def _edits(rng: random.Random, body: dict) -> dict:
    """One semantic edit of a license body: what a customer would try."""
    b = copy.deepcopy(body)
    choice = rng.randrange(10)
    if choice == 0:
        b["expires"] += rng.choice([1, 86400, 10**8])
    elif choice == 1:
        b["not_before"] -= rng.randint(1, 10**6)
    elif choice == 2:
        b["features"] = b["features"] + ["admin"]
    elif choice == 3:
        b["machines"][0]["id"] = "m_" + os.urandom(12).hex()
    elif choice == 4:
        b["customer"] = b["customer"] + "x"
    elif choice == 5:
        b["match_policy"] = "any"
    elif choice == 6:
        b["machines"][0]["facts"] = {}
    elif choice == 7:
        b["model"]["file_id"] = os.urandom(16).hex()
    elif choice == 8:
        b["mode"] = "lease"
        b["lease"] = {"url": "http://127.0.0.1:1", "server_key": b["vendor_key"], "ttl": 10, "grace": 1, "seats": 9}
    else:
        k = rng.choice(sorted(b))
        b[k] = rng.choice([None, 0, "", [], {}, True, "x" * 5])
    return b


def test_license_mutations_all_rejected(vendor, machine, tmp_path):
    model = tmp_path / "m.gguf"
    write_gguf(model, 2 * CHUNK)
    moat = tmp_path / "a.moat"
    sealed = vendor.seal(model, "acme", moat, chunk_size=CHUNK)
    doc = vendor.issue_license(customer="acme", model=moat, machines=[machine.identity()], expires=int(time.time()) + 86400)
    raw = json.dumps(doc).encode()
    guard = ClockGuard(machine)
    assert check(License.parse(raw), sealed, machine, guard).content_key is not None
    rng = random.Random(99)
    counts: dict[str, int] = {}
    done = 0
    for i in range(N_LICENSE):
        kind = ("flip", "truncate", "extend", "edit", "resign_other_key")[i % 5]
        if kind == "flip":
            data = bytearray(raw)
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            data = bytearray(raw[: rng.randrange(len(raw))])
        elif kind == "extend":
            data = bytearray(raw + bytes([rng.choice(b'x}]0,"')]) + os.urandom(rng.randint(0, 8)))
        elif kind == "edit":
            d = copy.deepcopy(doc)
            d["license"] = _edits(rng, doc["license"])
            data = bytearray(json.dumps(d).encode())
        else:  # an edited body re-signed by someone else's key, with that key named as the vendor's
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            from codemoat.vault.codec import b64e, canonical, public_raw, sign

            forger = Ed25519PrivateKey.generate()
            body = _edits(rng, doc["license"])
            body["vendor_key"] = b64e(public_raw(forger.public_key()))
            d = {
                "kind": doc["kind"],
                "version": doc["version"],
                "license": body,
                "signature": b64e(sign(forger, b"codemoat-license-v1", canonical(body))),
            }
            data = bytearray(json.dumps(d).encode())
        if bytes(data) == raw:
            continue
        done += 1

        def attempt() -> None:
            check(License.parse(bytes(data)), sealed, machine, guard)

        _expect_refused(attempt, kind, counts)
    assert done >= N_LICENSE - 5
    assert done + N_CONTAINER >= 10_000
    assert any("bad signature" in k or "license" in k for k in counts)


def test_hostile_json_is_a_clean_refusal(vendor, machine, tmp_path):
    """NaN, deep nesting and wrong types in a license or a manifest: refused, never a crash."""
    import struct

    from codemoat.vault.container import MAGIC

    hostile = [
        b'{"kind":"codemoat-license","version":1,"license":{"x":NaN},"signature":"AA=="}',
        b'{"kind":"codemoat-license","version":1,"license":' + b"[" * 100000 + b"]" * 100000 + b"}",
        b'{"kind":"codemoat-license","version":1,"license":[],"signature":"AA=="}',
        b'{"kind":"codemoat-license","version":1,"license":{},"signature":5}',
        b"\xff\xfe",
        b"null",
    ]
    for doc in hostile:
        try:
            License.parse(doc)
        except VaultError:
            continue
        raise AssertionError(doc[:60])
    for manifest in (b'{"a":NaN}', b"[" * 5000 + b"]" * 5000, b'{"file_id":1}', b"\xff"):
        p = tmp_path / "h.moat"
        p.write_bytes(MAGIC + struct.pack(">HI", 1, len(manifest)) + manifest + bytes(64))
        try:
            SealedFile(p)
        except VaultError:
            continue
        raise AssertionError(manifest[:60])
