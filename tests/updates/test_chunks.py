"""Bundle format 2: the signed manifest lists the SHA-256 of every payload chunk, so verify and apply
check chunks in parallel and apply writes only chunks that checked out. An attacker's view: a changed,
swapped, missing or extra chunk, and a signed chunk list that does not fit the size, are each refused
in one line with nothing installed; a format-1 bundle (one digest) still installs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError
from codemoat.updates import bundle as fmt
from updhelp import one_line_error, run_cli

SMALL = 4096  # chunk size of the bundles below: the tiny model's .moat is many chunks


def _rechunk(shop, src: Path, out: Path, chunk: int = SMALL, **payload) -> Path:
    """`src` released again with `chunk`-byte chunks (payload fields overridden by `payload`), signed
    with the vendor's own key: a genuine bundle, or a vendor bug when `payload` says otherwise."""
    b = fmt.Bundle(src)
    data = b"".join(b.pieces())
    view = memoryview(data)

    def read_at(lo, part):
        part[:] = view[lo : lo + len(part)]

    p = dict(fmt.describe_payload(b.manifest["payload"]["format"], read_at, len(data), chunk), **payload)
    return fmt.write(out, dict(b.manifest, payload=p), shop.vendor.signing_key, [data])


def _nothing_installed(store) -> None:
    assert store.current("model") is None
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
    lic = shop.license()
    b = _rechunk(shop, shop.release("1"), tmp_path / "chunked.moatpkg")
    bundle = fmt.Bundle(b)
    assert bundle.version == 2 and len(bundle.manifest["payload"]["chunks"]) > 8
    return b, bundle, lic


def test_release_signs_a_digest_per_chunk_and_apply_installs_the_same_bytes(shop, store, chunked, tmp_path):
    path, bundle, lic = chunked
    m = fmt.Bundle(shop.release("1")).manifest["payload"]
    assert m["chunk_size"] == fmt.CHUNK and "sha256" not in m
    p = bundle.manifest["payload"]
    payload = b"".join(bundle.pieces())
    for i, d in enumerate(p["chunks"]):
        assert hashlib.sha256(payload[i * SMALL : (i + 1) * SMALL]).hexdigest() == d
    store.verify(path, lic)
    out = store.apply(path, lic)
    assert (Path(out["dir"]) / "model.moat").read_bytes() == payload


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
    return fmt.write(out, dict(b.manifest, payload=p), shop.vendor.signing_key, [data], version=1)


def test_a_format_1_bundle_still_verifies_and_installs_and_is_still_checked(shop, store, tmp_path):
    lic = shop.license()
    old = _format1(shop, shop.release("1"), tmp_path / "old.moatpkg")
    assert fmt.Bundle(old).version == 1
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
    line = one_line_error(run_cli("update", "apply", str(path), "--license", str(lic)))
    assert "chunk 5 of" in line and "signed digest" in line
