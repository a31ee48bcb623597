"""Sealed containers and licenses shaped by an attacker, read by codemoat's own parsers (outside
review, helper R2): each is one `VaultError` line (and one line from `codemoat inspect`, exit 1),
never a traceback, in bounded time and memory; none is a flaw found (all held), kept as tests.

The attacker signs with a key of their own: the reader checks a file's signature against the vendor
key the file names (trust in that key is checked later, against the license and the trust file), so
every field below is one the parser itself must survive.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from codemoat.vault.codec import VaultError, b64e, canonical, public_raw, sign
from codemoat.vault.container import MAGIC, PREFIX, SIGN_DOMAIN, TAG_LEN, VERSION, SealedFile
from codemoat.vault.license import DOMAIN, KIND, License
from codemoat.vault.license import VERSION as LIC_VERSION

KEY = Ed25519PrivateKey.generate()
VK = b64e(public_raw(KEY.public_key()))


def _manifest(**kw) -> dict:
    f = dict(
        file_id="f" * 32,
        model_id="m",
        format="gguf",
        plaintext_size=5000,
        plaintext_sha256="0" * 64,
        chunk_size=4096,
        customer="c",
        customer_id="c1",
        key_id="k" * 32,
        created=1,
        vendor_key=VK,
        parts=[{"name": "model.gguf", "offset": 0, "size": 5000}],
        fingerprinted=False,
    )
    f.update(kw)
    return f


def _sealed(f: dict | None, *, manifest: bytes | None = None, mlen: int | None = None, payload: bytes | None = None) -> bytes:
    man = canonical(f) if manifest is None else manifest
    signed = PREFIX.pack(MAGIC, VERSION, len(man) if mlen is None else mlen) + man
    if payload is None:  # the size the manifest claims (none for a claim too large to write)
        ps, cs = (f or {}).get("plaintext_size", 0), (f or {}).get("chunk_size", 4096)
        payload = bytes(ps + TAG_LEN * max(1, -(-ps // cs))) if 0 <= ps < 1 << 24 and 4096 <= cs else b""
    return signed + sign(KEY, SIGN_DOMAIN, signed) + payload


GOOD = _sealed(_manifest())
_M = len(canonical(_manifest()))

CONTAINERS = {
    "cut in the prefix": (GOOD[:10], "too short"),
    "cut in the manifest": (GOOD[: PREFIX.size + 20], "truncated inside its header"),
    "cut in the signature": (GOOD[: PREFIX.size + _M + 30], "truncated inside its header"),
    "cut in the last chunk": (GOOD[:-1], "sealed file is truncated: "),
    "a trailing byte": (GOOD + b"x", "1 unexpected trailing bytes"),
    "manifest length 2^32-1": (_sealed(_manifest(), mlen=(1 << 32) - 1), "truncated inside its header"),
    "manifest length short": (_sealed(_manifest(), mlen=50), "not valid JSON"),
    "manifest length long": (_sealed(_manifest(), mlen=_M + 10), "not valid JSON"),
    "duplicated key": (_sealed(None, manifest=canonical(_manifest())[:-1] + b',"format":"gguf"}'), "not in canonical form"),
    "unknown format": (_sealed(_manifest(format="onnx")), "is not one of gguf, safetensors"),
    "a 5,000-digit number": (
        _sealed(None, manifest=canonical(_manifest())[:-1] + b',"zz":' + b"1" * 5000 + b"}"),
        "not valid JSON",
    ),
    "NaN": (_sealed(None, manifest=b'{"a":NaN}'), "not valid JSON"),
    "nested 100,000 deep": (_sealed(None, manifest=b"[" * 100_000), "not valid JSON"),
    "not UTF-8": (_sealed(None, manifest=b'{"a":"\xff"}'), "not valid JSON"),
    "not an object": (_sealed(None, manifest=b"[1]"), "not a JSON object"),
    "a field missing": (_sealed({k: v for k, v in _manifest().items() if k != "parts"}), "field 'parts' is missing"),
    "vendor key not base64": (_sealed(_manifest(vendor_key="!!")), "not valid base64"),
    "vendor key 31 bytes": (_sealed(_manifest(vendor_key=b64e(b"x" * 31))), "not a 32-byte Ed25519"),
    "another key's signature": (GOOD[: PREFIX.size + _M] + bytes(64) + GOOD[PREFIX.size + _M + 64 :], "bad signature"),
    # a header that parses and is signed, whose chunk table does not fit the file
    "plaintext 2^62 bytes": (
        _sealed(_manifest(plaintext_size=1 << 62, parts=[{"name": "a", "offset": 0, "size": 1 << 62}])),
        "sealed file is truncated: ",
    ),
    "plaintext smaller than the chunks": (
        _sealed(_manifest(plaintext_size=100, parts=[{"name": "a", "offset": 0, "size": 100}]), payload=bytes(5032)),
        "unexpected trailing bytes",
    ),
    "plaintext -1": (_sealed(_manifest(plaintext_size=-1, parts=[{"name": "a", "offset": 0, "size": -1}])), "out of range"),
    "chunk size 0": (_sealed(_manifest(chunk_size=0)), "out of range"),
    "chunk size 2^40": (_sealed(_manifest(chunk_size=1 << 40)), "out of range"),
    "chunk size true": (_sealed(_manifest(chunk_size=True)), "'chunk_size' is missing or malformed"),
    "parts overlap": (
        _sealed(_manifest(parts=[{"name": "a", "offset": 0, "size": 5000}, {"name": "b", "offset": 0, "size": 0}])),
        "parts are malformed",
    ),
    "a part of -1000 bytes": (
        _sealed(_manifest(parts=[{"name": "a", "offset": 0, "size": 6000}, {"name": "b", "offset": 6000, "size": -1000}])),
        "parts are malformed",
    ),
    "parts short of the size": (_sealed(_manifest(parts=[{"name": "a", "offset": 0, "size": 10}])), "do not add up"),
}


def test_the_well_formed_container_opens(tmp_path):
    (p := tmp_path / "ok.moat").write_bytes(GOOD)
    sf = SealedFile(p)
    assert sf.n_chunks == 2 and sf.manifest.plaintext_size == 5000 and sf.file_size == len(GOOD)


@pytest.mark.parametrize("what", CONTAINERS)
def test_hostile_container_is_one_line(what, tmp_path):
    data, want = CONTAINERS[what]
    (p := tmp_path / "bad.moat").write_bytes(data)
    with pytest.raises(VaultError) as e:
        SealedFile(p)
    assert want in str(e.value) and "\n" not in str(e.value), str(e.value)


def _license_doc(body: dict, **outer) -> bytes:
    d = dict(kind=KIND, version=LIC_VERSION, license=body, signature=b64e(sign(KEY, DOMAIN, canonical(body))))
    d.update(outer)
    return json.dumps(d).encode()


def _body(**kw) -> dict:
    b = dict(
        id="l1",
        customer="c",
        customer_id="c1",
        mode="offline",
        match_policy="all",
        issued_at=1,
        not_before=1,
        expires=2**40,
        watermark=False,
        model=dict(file_id="f", manifest_sha256="s", key_id="k", model_id="m", format="gguf"),
        features=[],
        machines=[dict(id="m_1", facts={})],
        keys=dict(content_key={}),
        vendor_key=VK,
    )
    b.update(kw)
    return b


LIC = _license_doc(_body())
_EXP = b'"expires": 1099511627776'
_LATER = json.dumps(_body(expires=2**50)).encode()

LICENSES = {
    "trailing bytes": (LIC + b"xyz", "not valid JSON"),
    "a second object after": (LIC + b"{}", "not valid JSON"),
    "a NUL after": (LIC + b"\0", "not valid JSON"),
    "cut short": (LIC[:-5], "not valid JSON"),
    "not UTF-8": (LIC.replace(b'"c1"', b'"\xff"'), "not valid JSON"),
    "nested 100,000 deep": (b'{"kind":' + b"[" * 100_000, "not valid JSON"),
    "a 5,000-digit expiry": (LIC.replace(_EXP, b'"expires": ' + b"9" * 5000), "not valid JSON"),
    "NaN expiry": (LIC.replace(_EXP, b'"expires": NaN'), "not canonical JSON"),
    # a duplicated field: the last one is what is read and what the signature must cover
    "a second, unsigned body after": (LIC[:-1] + b', "license": ' + _LATER + b"}", "bad signature"),
    "a duplicated expiry": (LIC.replace(_EXP, _EXP + b', "expires": 1125899906842624'), "bad signature"),
    "signature a number": (_license_doc(_body(), signature=5), "not a base64 string"),
    "signature 1 byte": (_license_doc(_body(), signature=b64e(b"x")), "bad signature"),
    "version '1'": (_license_doc(_body(), version="1"), "not supported"),
    "expiry a float": (_license_doc(_body(expires=1e12)), "'expires' is missing or malformed"),
    "expiry true": (_license_doc(_body(expires=True)), "'expires' is missing or malformed"),
    "model nested 900 deep": (_license_doc(_body(model=json.loads("[" * 900 + "]" * 900))), "'model' is missing or malformed"),
    "no machine": (_license_doc(_body(machines=[])), "'machines' is malformed"),
    "offline for two machines": (_license_doc(_body(machines=[dict(id="a", facts={}), dict(id="b", facts={})])), "one machine"),
    "TPM binding without its block": (_license_doc(_body(machines=[dict(id="a", facts={}, binding="tpm")])), "'machines'"),
    "TPM block a number": (_license_doc(_body(machines=[dict(id="a", facts={}, binding="tpm", tpm=7)])), "TPM block"),
    "lease of junk": (_license_doc(_body(mode="lease", lease={"url": 1})), "'lease' is malformed"),
    "over 16 MiB": (b'{"a": "' + b"x" * (16 << 20) + b'"}', "larger than 16 MiB"),
    "a list of 5M lists": (b"[" + b"[]," * 5_000_000 + b"[]]", "not a codemoat license"),
}


def test_the_well_formed_license_parses_and_a_first_duplicate_is_not_what_is_read(tmp_path):
    (p := tmp_path / "ok.lic").write_bytes(LIC + b"\n")
    assert License.load(p).expires == 2**40
    # a forged body first, the signed one last: the signed one is what is read (json keeps the last)
    (p := tmp_path / "first.lic").write_bytes(b'{"license": ' + _LATER + b", " + LIC[1:])
    assert License.load(p).expires == 2**40


@pytest.mark.parametrize("what", LICENSES)
def test_hostile_license_is_one_line(what, tmp_path):
    data, want = LICENSES[what]
    (p := tmp_path / "bad.lic").write_bytes(data)
    with pytest.raises(VaultError) as e:
        License.load(p)
    assert want in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_inspect_refuses_each_kind_in_one_line(tmp_path):
    """The CLI a customer or vendor runs on a file from elsewhere: one 'error: ...' line, exit 1."""
    picks = {
        "a.moat": CONTAINERS["plaintext 2^62 bytes"],
        "b.moat": CONTAINERS["nested 100,000 deep"],
        "c.lic": LICENSES["a second, unsigned body after"],
        "d.lic": LICENSES["nested 100,000 deep"],
    }
    for name, (data, want) in picks.items():
        (p := tmp_path / name).write_bytes(data)
        r = subprocess.run(
            [sys.executable, "-m", "codemoat.cli.main", "inspect", str(p), "--json"], capture_output=True, text=True, timeout=60
        )
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], r.stderr
    (p := tmp_path / "ok.moat").write_bytes(GOOD)
    r = subprocess.run(
        [sys.executable, "-m", "codemoat.cli.main", "inspect", str(p), "--json"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and json.loads(r.stdout)["chunks"] == 2, r.stderr


def test_unseal_of_an_altered_file_writes_no_plaintext(vendor, model, tmp_path):
    """The last chunk's tag fails: the vendor's unseal decrypts everything before writing, so nothing of
    the model (not the chunks that did authenticate) is on disk afterwards."""
    sealed = vendor.seal(model, "acme", tmp_path / "a.moat", chunk_size=4096)
    data = bytearray(sealed.path.read_bytes())
    data[-3] ^= 1
    (bad := tmp_path / "bad.moat").write_bytes(data)
    before = {p for p in tmp_path.rglob("*")}
    with pytest.raises(VaultError, match="failed authentication"):
        vendor.unseal(bad, tmp_path / "out" / "m.gguf")
    assert {p for p in tmp_path.rglob("*")} == before
    vendor.unseal(sealed.path, tmp_path / "out" / "m.gguf")  # the positive: the unaltered file
    assert (tmp_path / "out" / "m.gguf").read_bytes() == model.read_bytes()
