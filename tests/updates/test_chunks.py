"""Bundle format 2: the signed manifest lists the SHA-256 of every payload chunk, so verify and apply
check chunks in parallel and apply writes only chunks that checked out. A model's payload, a sealed
model, is checked by itself when its license (in the signed manifest, naming its signed header) wraps
the content key for this machine: every chunk's GCM tag, faster than hashing; under a lease (no key
offline) by the digests. An attacker's view: a changed, swapped, missing or extra chunk, and a signed chunk
list that does not fit the size, are each refused in one line with nothing installed; a format-1
bundle (one digest) still installs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError
from codemoat.updates import bundle as fmt
from updhelp import lora_gguf, one_line_error, run_cli

SMALL = 4096  # chunk size of the bundles below: the tiny model's .moat is many chunks


def _rechunk(shop, src: Path, out: Path, chunk: int = SMALL, **payload) -> Path:
    """`src` released again with `chunk`-byte chunks (payload fields overridden by `payload`), signed
    with the vendor's own key: a genuine bundle, or a vendor bug when `payload` says otherwise."""
    b = fmt.Bundle(src)
    data = b"".join(b.pieces())
    p = dict(_describe(b.manifest["payload"]["format"], data, chunk), **payload)
    return fmt.write(out, dict(b.manifest, payload=p), shop.vendor.signing_key, [data])


def _nothing_installed(store) -> None:
    assert store.list() == []
    bundles = store.root / "bundles"
    assert not bundles.exists() or not any(bundles.iterdir())
    staging = store.root / "staging"
    assert not staging.exists() or not any(staging.iterdir())


def _refused(store, path: Path, lic: Path, match: str) -> None:
    with pytest.raises(CodemoatError, match=match):
        store.verify(path, lic)
    with pytest.raises(CodemoatError, match=match):
        store.apply(path, lic)
    _nothing_installed(store)


@pytest.fixture
def chunked(shop, tmp_path):
    """An adapter bundle whose payload is 25 chunks."""
    lic = shop.license()
    src = tmp_path / "fee.gguf"
    lora_gguf(src, 160)  # ~100 KB
    b = _rechunk(shop, shop.release("1", kind="adapter", source=src), tmp_path / "chunked.moatpkg")
    bundle = fmt.Bundle(b)
    assert bundle.format_version == 2 and len(bundle.manifest["payload"]["chunks"]) > 8
    assert bundle.version == "1"  # the release's version (the manifest's), never the layout number
    return b, bundle, lic


def test_release_signs_a_digest_per_chunk_and_apply_installs_the_same_bytes(shop, store, chunked, tmp_path):
    path, bundle, lic = chunked
    src = tmp_path / "fee.gguf"
    m = fmt.Bundle(shop.release("2", kind="adapter", source=src)).manifest["payload"]
    assert m["chunk_size"] == fmt.CHUNK and len(m["chunks"]) == 1 and "sha256" not in m
    mp = fmt.Bundle(shop.release("1")).manifest["payload"]
    assert mp["format"] == "moat" and mp["chunk_size"] == fmt.CHUNK and len(mp["chunks"]) == 1
    p = bundle.manifest["payload"]
    payload = b"".join(bundle.pieces())
    for i, d in enumerate(p["chunks"]):
        assert hashlib.sha256(payload[i * SMALL : (i + 1) * SMALL]).hexdigest() == d
    store.verify(path, lic)
    out = store.apply(path, lic)
    assert (Path(out["dir"]) / "payload.sealed").read_bytes() == payload


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_byte_in_any_chunk_is_refused(store, chunked, where):
    path, bundle, lic = chunked
    n = len(bundle.manifest["payload"]["chunks"])
    i = {"first": 0, "middle": n // 2, "last": n - 1}[where]
    data = bytearray(path.read_bytes())
    data[bundle.payload_offset + i * SMALL + 7] ^= 0x40
    path.write_bytes(bytes(data))
    _refused(store, path, lic, f"chunk {i} of {n} does not match its signed digest")


def test_swapped_chunks_are_refused(store, chunked):
    path, bundle, lic = chunked
    data = bytearray(path.read_bytes())
    a, b = bundle.payload_offset + 2 * SMALL, bundle.payload_offset + 3 * SMALL
    data[a : a + SMALL], data[b : b + SMALL] = data[b : b + SMALL], data[a : a + SMALL]
    path.write_bytes(bytes(data))
    _refused(store, path, lic, "chunk [23] of .* does not match its signed digest")


def test_a_signed_list_in_another_order_is_refused(shop, store, chunked, tmp_path):
    path, bundle, lic = chunked
    digests = list(bundle.manifest["payload"]["chunks"])
    digests[1], digests[4] = digests[4], digests[1]
    evil = _rechunk(shop, path, tmp_path / "reordered.moatpkg", chunks=digests)
    _refused(store, evil, lic, "chunk [14] of .* does not match")  # whichever worker gets there first


def test_truncated_and_extended_payloads_are_refused(store, chunked, tmp_path):
    path, bundle, lic = chunked
    data = path.read_bytes()
    for name, blob, why in (
        ("short", data[:-1], "truncated"),
        ("chunk-short", data[:-SMALL], "truncated"),
        ("extra-chunk", data + data[-SMALL:], "unexpected trailing bytes"),
    ):
        p = tmp_path / f"{name}.moatpkg"
        p.write_bytes(blob)
        _refused(store, p, lic, why)


@pytest.mark.parametrize("change", ["extra", "missing", "size"])
def test_a_signed_chunk_list_that_does_not_fit_the_size_is_refused(shop, store, chunked, tmp_path, change):
    path, bundle, lic = chunked
    p = bundle.manifest["payload"]
    digests = list(p["chunks"])
    payload = {
        "extra": {"chunks": digests + [digests[-1]]},
        "missing": {"chunks": digests[:-1]},
        "size": {"size": p["size"] + SMALL},  # the file is then short too, but the list is checked first
    }[change]
    evil = _rechunk(shop, path, tmp_path / f"{change}.moatpkg", **payload)
    _refused(store, evil, lic, "payload chunks")


@pytest.mark.parametrize("bad", [{"chunk_size": 0}, {"chunk_size": 1 << 31}, {"chunks": "x"}, {"chunks": ["00" * 31]}])
def test_malformed_chunk_fields_are_refused(shop, store, chunked, tmp_path, bad):
    path, _, lic = chunked
    evil = _rechunk(shop, path, tmp_path / "bad.moatpkg", **bad)
    _refused(store, evil, lic, "'payload' is malformed")


def _format1(shop, src: Path, out: Path) -> Path:
    """`src` as codemoat made bundles before chunk digests: format 1, one SHA-256 of the payload."""
    b = fmt.Bundle(src)
    data = b"".join(b.pieces())
    p = {"format": b.manifest["payload"]["format"], "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return fmt.write(out, dict(b.manifest, payload=p), shop.vendor.signing_key, [data], format_version=1)


def test_a_format_1_bundle_still_verifies_and_installs_and_is_still_checked(shop, store, tmp_path):
    lic = shop.license()
    old = _format1(shop, shop.release("1"), tmp_path / "old.moatpkg")
    assert fmt.Bundle(old).format_version == 1
    data = bytearray(old.read_bytes())
    data[-100] ^= 1
    bad = tmp_path / "old-bad.moatpkg"
    bad.write_bytes(bytes(data))
    _refused(store, bad, lic, "does not match its signed digest")
    store.verify(old, lic)
    assert store.apply(old, lic)["version"] == "1"


def test_a_format_1_manifest_presented_as_format_2_is_refused(shop, store, tmp_path):
    """The format version is signed: relabelling an old bundle's header breaks the signature, and a
    vendor-signed format-2 header over a format-1 manifest has no chunk list."""
    lic = shop.license()
    old = _format1(shop, shop.release("1"), tmp_path / "old.moatpkg")
    data = bytearray(old.read_bytes())
    data[9] = 2
    relabelled = tmp_path / "relabelled.moatpkg"
    relabelled.write_bytes(bytes(data))
    _refused(store, relabelled, lic, "signature")
    b = fmt.Bundle(old)
    mixed = fmt.write(tmp_path / "mixed.moatpkg", b.manifest, shop.vendor.signing_key, b.pieces())
    _refused(store, mixed, lic, "'payload' is malformed")


def test_cli_names_the_bad_chunk_in_one_line(chunked):
    path, bundle, lic = chunked
    data = bytearray(path.read_bytes())
    data[bundle.payload_offset + 5 * SMALL] ^= 1
    path.write_bytes(bytes(data))
    line = one_line_error(run_cli("update", "verify", str(path), "--license", str(lic)))
    assert "chunk 5 of" in line and "signed digest" in line


@pytest.fixture
def model_bundle(shop, tmp_path):
    """A model bundle whose sealed model is many 4 KiB chunks (a genuine release, re-sealed smaller)."""
    import json

    lic = shop.license()
    moat = tmp_path / "small-chunks.moat"
    shop.vendor.seal(shop.gguf, "acme", moat, chunk_size=SMALL)
    b = fmt.Bundle(shop.release("1"))
    doc = shop.vendor.issue_license(
        customer="acme", model=moat, machines=[shop.machine.identity()], expires=b.manifest["license"]["license"]["expires"]
    )
    m = dict(b.manifest, license=json.loads(json.dumps(doc)), payload=_describe("moat", moat.read_bytes(), SMALL))
    path = fmt.write(tmp_path / "model.moatpkg", m, shop.vendor.signing_key, [moat.read_bytes()])
    from codemoat.vault.container import SealedFile

    sealed = SealedFile(path, offset=fmt.Bundle(path).payload_offset)
    assert sealed.n_chunks > 8
    return path, sealed, lic


def test_a_model_bundle_is_authenticated_by_its_own_gcm_tags(store, model_bundle):
    path, sealed, lic = model_bundle
    store.verify(path, lic)
    out = store.apply(path, lic)
    assert (Path(out["dir"]) / "model.moat").read_bytes() == path.read_bytes()[-sealed.file_size :]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_byte_in_any_sealed_model_chunk_is_refused(store, model_bundle, where):
    path, sealed, lic = model_bundle
    n = sealed.n_chunks
    i = {"first": 0, "middle": n // 2, "last": n - 1}[where]
    data = bytearray(path.read_bytes())
    data[sealed.payload_offset + i * (SMALL + 16) + 3] ^= 0x40
    path.write_bytes(bytes(data))
    _refused(store, path, lic, f"chunk {i} of {n} failed authentication")


def test_swapped_sealed_model_chunks_are_refused(store, model_bundle):
    path, sealed, lic = model_bundle
    data = bytearray(path.read_bytes())
    a, b = (sealed.payload_offset + k * (SMALL + 16) for k in (2, 3))
    w = SMALL + 16
    data[a : a + w], data[b : b + w] = data[b : b + w], data[a : a + w]
    path.write_bytes(bytes(data))
    _refused(store, path, lic, "chunk [23] of .* failed authentication")


def test_truncated_and_extended_model_payloads_are_refused(shop, store, model_bundle, tmp_path):
    path, sealed, lic = model_bundle
    data = path.read_bytes()
    for name, blob, why in (
        ("short", data[:-1], "truncated"),
        ("chunk-short", data[: -(SMALL + 16)], "truncated"),
        ("extra-chunk", data + data[-(SMALL + 16) :], "unexpected trailing bytes"),
    ):
        p = tmp_path / f"{name}.moatpkg"
        p.write_bytes(blob)
        _refused(store, p, lic, why)
    # a vendor-signed size and digest list that do not fit the sealed model: cut a chunk, or add one
    b = fmt.Bundle(path)
    for cut, why in ((SMALL + 16, "truncated"), (-(SMALL + 16), "trailing")):
        body = data[b.payload_offset :]
        body = body[:-cut] if cut > 0 else body + body[-(SMALL + 16) :]
        m = dict(b.manifest, payload=_describe("moat", body, SMALL))
        p = fmt.write(tmp_path / f"resigned-{cut}.moatpkg", m, shop.vendor.signing_key, [body])
        _refused(store, p, lic, why)


def test_under_a_lease_license_the_model_is_checked_by_its_signed_digests(shop, store, tmp_path):
    """A leased model's key comes from the key server, not the license: install (offline) checks the
    model payload's chunk digests instead of its GCM tags."""
    lic = shop.license(mode="lease", keyserver="http://127.0.0.1:9", lease_ttl=60, grace=60)
    good = _rechunk(shop, shop.release("1"), tmp_path / "leased.moatpkg")
    b = fmt.Bundle(good)
    data = bytearray(good.read_bytes())
    data[b.payload_offset + 6 * SMALL + 1] ^= 1
    bad = tmp_path / "leased-bad.moatpkg"
    bad.write_bytes(bytes(data))
    _refused(store, bad, lic, "chunk 6 of .* does not match its signed digest")
    store.verify(good, lic)
    assert store.apply(good, lic)["version"] == "1"


def _describe(kind: str, data: bytes, chunk: int) -> dict:
    view = memoryview(data)

    def read_at(lo, part):
        part[:] = view[lo : lo + len(part)]

    return fmt.describe_payload(kind, read_at, len(data), chunk)
