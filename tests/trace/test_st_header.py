"""A safetensors header is refused before it is decoded when it could cost more memory than a real
model's: more than `st_io.MAX_VALUES` JSON values, a length over the safetensors crate's 100 MB, or
no JSON object at all. Before, a 100 MB header of `[{},{},...]` took 2.5 GB (Python's json builds an
object for every value) before 'header is not a JSON object'; every reader of a header (`trace`, the
fingerprint at `vendor seal`, the vLLM loader, `vendor seal` itself) goes through `st_io.parse_header`."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from codemoat.errors import CodemoatError
from codemoat.trace import st_io, vendor_io


def _file(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _real() -> bytes:
    """A safetensors file as the safetensors library writes it (with metadata)."""
    import torch
    from safetensors.torch import save

    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.ones((4, 2), dtype=torch.bfloat16) for i in range(40)}
    return save(tensors | {"norm": torch.zeros(3)}, metadata={"format": "pt"})


def _zero_tensors(n: int) -> bytes:
    """A header of `n` well-formed entries of zero-size tensors: a valid file, every entry checked."""
    return b"{" + b",".join(b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(n)) + b"}"


def test_a_real_file_still_reads():
    data = _real()
    head, base = st_io.buffer_header(memoryview(data))
    assert len(head) == 41 and head["norm"]["shape"] == [3] and base > 8
    assert st_io.read_matrices(data)["model.layers.39.mlp.up_proj.weight"].shape == (4, 2)
    # metadata strings full of commas and brackets count against the budget, and a real one is far below it
    meta = json.dumps({"__metadata__": {"notes": "[{" * 20_000 + ", " * 20_000}}).encode()
    assert st_io.parse_header(meta, 0) == {}
    # the most values allowed: 285,713 tensors of one dimension (7 values each) still read
    many = (st_io.MAX_VALUES // 7) - 1
    assert len(st_io.parse_header(_zero_tensors(many), 0)) == many


@pytest.mark.parametrize(
    "header,why",
    [
        (b"[" + b"{}," * 1_000 + b"{}]", "header is not a JSON object"),
        (b" \n\t" * 1_000 + b"[" + b"[]," * 1_000 + b"[]]", "header is not a JSON object"),
        # under the old code this was decoded (a million dicts), then refused as "header entry 'a' ..."
        (b'{"a":[' + b"{}," * (st_io.MAX_VALUES // 2) + b"{}]}", "header holds more than 2000000 JSON values"),
        (b'{"a":[' + b"1.5," * st_io.MAX_VALUES + b"1.5]}", "header holds more than 2000000 JSON values"),
        (_zero_tensors(st_io.MAX_VALUES // 7 + 1), "header holds more than 2000000 JSON values"),
    ],
    ids=["array", "array-after-spaces", "objects", "floats", "tensors"],
)
def test_a_header_of_too_many_values_is_refused_before_decoding(header, why):
    with pytest.raises(CodemoatError, match=why) as e:
        st_io.buffer_header(memoryview(_file(header)))
    assert str(e.value).startswith("not a safetensors file: ") and "\n" not in str(e.value)


def test_a_header_length_over_the_limit_is_named(tmp_path):
    p = tmp_path / "long.safetensors"
    p.write_bytes(struct.pack("<Q", st_io.MAX_HEADER + 1) + b"{}")  # refused before the file's size matters
    with pytest.raises(CodemoatError, match="header length 100000001 over the 100000000-byte limit") as e:
        vendor_io.tensor_shapes(p)
    assert str(e.value).startswith(f"{p}: not a safetensors file: ")
    p.write_bytes(_file(b"{}") + b"\0" * 8)
    assert vendor_io.tensor_shapes(p) == {}


# VmHWM, this process's own peak: ru_maxrss would count the parent's too (Linux keeps it across exec)
_PEAK = """
import sys
from codemoat.errors import CodemoatError
from codemoat.trace import vendor_io
try:
    vendor_io.tensor_shapes(sys.argv[1])
    print("read")
except CodemoatError as e:
    print(e)
print(next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:")) // 1024)
"""


@pytest.mark.slow  # a 100 MB file and a subprocess
@pytest.mark.parametrize("shape", ["objects", "tensors"])
def test_refusing_a_100_mb_header_costs_about_its_size_in_memory(tmp_path, shape):
    """The crate's largest header, 100 MB, of a million-fold repeated small value. Before: 2.5 GB peak
    for `{}` values, 1.2 GB for well-formed zero-size tensors (measured in session 17); now refused
    at about the header's own size (the bytes read, once). A memory bound, not a time one: peak RSS
    does not depend on the machine's load."""
    n = st_io.MAX_HEADER
    if shape == "objects":
        header = b'{"a":[' + b"{}," * ((n - 9) // 3) + b"{}]}"
    else:
        one = b'"t":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
        header = b"{" + one * ((n - 80) // len(one)) + one[:-1] + b"}"
    assert st_io.MAX_HEADER - 100 < len(header) <= st_io.MAX_HEADER
    p = tmp_path / "big.safetensors"
    p.write_bytes(_file(header))
    del header
    try:
        r = subprocess.run([sys.executable, "-c", _PEAK, str(p)], capture_output=True, text=True, timeout=300)
    finally:
        p.unlink()
    assert r.returncode == 0, r.stderr
    said, peak_mb = r.stdout.splitlines()
    assert said.startswith(f"{p}: not a safetensors file: header holds more than"), said
    assert int(peak_mb) < 600, f"peak {peak_mb} MB refusing a 100 MB header"


def test_vendor_io_reads_a_real_file(tmp_path):
    p = tmp_path / "real.safetensors"
    p.write_bytes(_real())
    shapes = vendor_io.tensor_shapes(p)
    assert shapes["norm"] == (3,) and shapes["model.layers.0.mlp.up_proj.weight"] == (4, 2)


def test_the_limit_admits_a_large_real_model():
    """DeepSeek-V3 (~91,000 tensors in all its shards) as one file: 2-D tensors, names as long as its
    longest, each entry 8 values; the budget holds twice that many."""
    name = b"model.layers.60.mlp.experts.255.down_proj.weight_scale_inv"
    one = b'"%s%%d":{"dtype":"BF16","shape":[7168,2048],"data_offsets":[0,0]}' % name
    n = 182_000
    head = b"{" + b",".join(one % i for i in range(n)) + b"}"
    assert len(head) < 25_000_000  # ~23 MB: under a quarter of the length limit
    st_io._check_values(head)  # admitted: no error
    assert head.count(b",") + head.count(b"{") + head.count(b"[") <= st_io.MAX_VALUES
