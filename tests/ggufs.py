"""Small valid GGUF files for tests that seal, license or serve a model but never run it.

`vendor seal` refuses a file that does not parse whole as a GGUF (`vault.seal_model.check_model`), so the
magic followed by random bytes no longer stands in for a model. `write_gguf` writes a real one, as fast:
a header with a little metadata and one random float32 matrix (wide enough to carry a fingerprint), about
`size` bytes in all, different every call unless `seed` is given. llama.cpp does not load it (no layers, no
vocabulary): tests that run the model use the `gguf_file` fixture (`tinymodel.build_tiny_gguf`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLS = 64  # values per row: a fingerprint marks matrices whose rows hold >= 32


def write_gguf(
    path: str | Path, size: int = 20_000, *, seed: int | None = None, name: str = "blob.weight", markable: bool = True
) -> Path:
    """A valid GGUF at `path` of about `size` bytes (a few hundred more for the header), returned. Not
    `markable`, its one tensor is a vector, which no fingerprint marks (`vendor seal` then needs --no-fingerprint)."""
    import gguf

    path = Path(path)
    rows = max(16, -(-size // (COLS * 4)))  # 16 x 64 = 1024 values: the least a fingerprint marks
    shape = (rows, COLS) if markable else (rows * COLS,)
    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(path.stem)
    w.add_tensor(name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_bytes(size: int = 20_000, *, seed: int | None = None) -> bytes:
    """The bytes of a `write_gguf` file (written in a temporary folder, read back)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return write_gguf(Path(d) / "m.gguf", size, seed=seed).read_bytes()


def truncated(path: str | Path, out: str | Path, keep: float = 0.5) -> Path:
    """`out`: the GGUF at `path` cut to `keep` of its length (its header whole, its tensor data not)."""
    data = Path(path).read_bytes()
    out = Path(out)
    out.write_bytes(data[: int(len(data) * keep)])
    return out
