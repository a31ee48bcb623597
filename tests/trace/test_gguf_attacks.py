"""A suspect GGUF shaped by an adversary to break `codemoat vendor trace` (or evade it), read by
trace/gguf_stream.py: each is one line (CodemoatError) in bounded memory and time, never a traceback.

Held before (kept as tests): counts of 2^64-1 tensors or key/values, a string or array that claims
2^64-1 bytes, offsets past the end, an unknown or retired ggml type, more than 8 dimensions, a
version-1 header, an empty file. Fixed: an alignment of 0 (ZeroDivisionError), negative (tensor data
inside the header) or a string (int("32") took it; llama.cpp wants a u32), a dims product that
wraps in int64 (2^32 x 2^32 values = 0 bytes: the header passed and reading the tensor allocated
until the machine ran out), arrays nested 5,000 deep (RecursionError), and a skipped array read
whole into memory (a sparse file's 4 GiB array: 4 GiB of RAM for nothing), and headers of up to 2^24
tensors or key/values parsed (~400 bytes each: ~7 GB); now 2^18 at most.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError
from codemoat.trace.gguf_stream import GGUFFile


def _s(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _tensor(name: str, ne: tuple[int, ...], typ: int = 0, off: int = 0) -> bytes:
    return _s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, typ, off)


def _gguf(
    kvs: list[bytes], tensors: list[bytes], data: bytes = bytes(4096), n_t: int | None = None, n_kv: int | None = None
) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_t is None else n_t, len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    return head + bytes(-len(head) % 32) + data


U64 = (1 << 64) - 1
W = _tensor("w", (32, 32))  # 32x32 F32: the 4096 data bytes

HOSTILE = {
    # fixed
    "alignment 0": _gguf([_kv("general.alignment", 4, struct.pack("<I", 0))], [W]),
    "alignment -32": _gguf([_kv("general.alignment", 5, struct.pack("<i", -32))], [W]),
    "dims product wraps": _gguf([], [_tensor("w", (1 << 32, 1 << 32))]),
    "arrays nested 5,000 deep": _gguf([_kv("a", 9, struct.pack("<IQ", 9, 1) * 5000)], []),
    # held before
    "string of 2^40 bytes": _gguf([_kv("general.name", 8, struct.pack("<Q", 1 << 40))], []),
    "2^64-1 tensors": _gguf([], [], n_t=U64),
    "2^24 tensors": _gguf([], [], n_t=1 << 24),
    "2^64-1 key/values": _gguf([], [], n_kv=U64),
    "key of 2^64-1 bytes": b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, U64),
    "array of 2^64-1 u8": _gguf([_kv("a", 9, struct.pack("<IQ", 0, U64))], []),
    "array of 2^62 strings": _gguf([_kv("a", 9, struct.pack("<IQ", 8, 1 << 62))], []),
    "unknown value type": _gguf([_kv("a", 77, b"")], []),
    "alignment a string": _gguf([_kv("general.alignment", 8, _s("32"))], [W]),
    "alignment NaN": _gguf([_kv("general.alignment", 6, struct.pack("<f", float("nan")))], [W]),
    "offset past the end": _gguf([], [_tensor("w", (32, 32), 0, U64)]),
    "one dim 2^64-1": _gguf([], [_tensor("w", (U64, 1))]),
    "unknown ggml type": _gguf([], [_tensor("w", (32, 32), 999)]),
    "retired ggml type (Q4_2)": _gguf([], [_tensor("w", (32, 32), 4)]),
    "row not whole blocks": _gguf([], [_tensor("w", (33, 32), 8)]),
    "9 dimensions": _gguf([], [_tensor("w", (1,) * 9)]),
    "version 1": b"GGUF" + struct.pack("<IQQ", 1, 0, 0),
    "key not UTF-8": _gguf([struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<I", 4) + bytes(4)], []),
    "empty": b"",
}


@pytest.mark.parametrize("what", HOSTILE)
def test_hostile_header_is_one_line(what, tmp_path):
    bad = tmp_path / "suspect.gguf"
    bad.write_bytes(HOSTILE[what])
    with pytest.raises(CodemoatError, match=r"suspect\.gguf: truncated or not a valid GGUF file$"):
        GGUFFile(bad)
    assert not _open_fds_to(bad)  # the descriptor is closed on refusal


def _open_fds_to(path: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                out.append(fd)
        except OSError:
            pass
    return out


def test_a_header_of_too_many_real_tensors_is_refused_unparsed(tmp_path):
    """Was broken: up to 2^24 tensors were parsed, ~400 bytes of memory each (~7 GB from a 560 MB
    file); now more than 2^18 (a hundred times the largest model's) is refused before the first."""
    from codemoat.trace.gguf_stream import MAX_COUNT

    one = _tensor("w", (32,))
    for n, ok in ((MAX_COUNT, True), (MAX_COUNT + 1, False)):
        (p := tmp_path / f"{n}.gguf").write_bytes(_gguf([], [one] * n, data=bytes(128)))
        if ok:
            with GGUFFile(p) as g:
                assert len(g.tensors) == n
        else:
            with pytest.raises(CodemoatError, match="truncated or not a valid GGUF file"):
                GGUFFile(p)


def test_the_same_file_well_formed_opens(tmp_path):
    """The positive beside the attacks: alignment 64, a nested array, a skipped string array, one tensor."""
    kvs = [
        _kv("general.alignment", 4, struct.pack("<I", 64)),
        _kv("a", 9, struct.pack("<IQ", 9, 1) * 3 + struct.pack("<IQ", 0, 1) + b"\x07"),
        _kv("v", 9, struct.pack("<IQ", 8, 2) + _s("x") + _s("yz")),
        _kv("general.name", 8, _s("m")),
    ]
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(kvs) + W
    data = struct.pack("<1024f", *range(1024))
    (p := tmp_path / "ok.gguf").write_bytes(head + bytes(-len(head) % 64) + data)
    with GGUFFile(p) as g:
        assert g.metadata == {"general.alignment": 64, "general.name": "m"} and g.header_size % 64 == 0
        (t,) = g.tensors
        assert t.shape == (32, 32) and t.nbytes == 4096
        assert g.matrix(t)[1, 0] == 32.0


_SKIP_HUGE = """
import resource, struct, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from codemoat.trace.gguf_stream import GGUFFile
with GGUFFile(sys.argv[1]) as g:
    print(len(g.tensors), g.metadata)
"""


def test_a_huge_skipped_array_costs_no_memory(tmp_path):
    """Was broken: an array (a vocabulary, or 4 GiB of zeros in a sparse file) was read into memory to be
    skipped. Under a 3 GiB address-space limit the file was refused (MemoryError); now it opens."""
    n = 4 << 30
    p = tmp_path / "sparse.gguf"
    with open(p, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + _kv("a", 9, struct.pack("<IQ", 0, n)))
        f.seek(n, os.SEEK_CUR)
        f.write(_kv("general.name", 8, _s("after")))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _SKIP_HUGE, str(p)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-500:]
    assert r.stdout.strip() == "0 {'general.name': 'after'}"
    # the attacker's version: the same array claims one byte more than the file holds
    with open(p, "r+b") as f:
        f.seek(4 + 4 + 8 + 8 + 9 + 4 + 4)
        f.write(struct.pack("<Q", os.path.getsize(p)))
    r = subprocess.run([sys.executable, "-c", _SKIP_HUGE, str(p)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "truncated or not a valid GGUF file" in r.stderr.splitlines()[-1]
