"""A LoRA adapter folded into a copy of its base's weights, in memory: W' = W + (alpha / r) · B·A.

llama.cpp applies an adapter at run time as two extra matmuls, a scale and an add per adapted
matrix and layer; on a small model those dozens of extra graph nodes per layer cost as much as
the model's own work (a completion took ~2x as long with any adapter set). Folded in, as llama.cpp's
`llama-export-lora` does, the copy runs the base's own graph at the base's speed, for one more
copy of the weights in memory per adapter.

The copy keeps every tensor's type and size, so it is the base's bytes with the adapted tensors
rewritten in place: float tensors (F32, F16, BF16) through numpy, quantised ones dequantised by the
`gguf` package and quantised again by ggml's own `ggml_quantize_chunk` (the function llama.cpp's
quantiser calls). Requantising adds that type's rounding error on top of the adapter's change: on
a low-bit type it can be as large as the change itself, so callers fold adapters into float and
8-bit bases only (`FOLDABLE`). The copy lives in a sealed memfd (`MemfdBuffer`), never on disk.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from ..errors import CodemoatError
from .memfd import MemfdBuffer

FOLDABLE = {"F32", "F16", "BF16", "Q8_0"}  # base tensor types an adapter is folded into


def _ggml_quantize(qtype: int, rows: np.ndarray, nbytes: int) -> bytes:
    """`rows` (n_rows, n_per_row) float32 quantised by ggml into `qtype` (the library llama.cpp loaded)."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    src = np.ascontiguousarray(rows, dtype=np.float32)
    out = ctypes.create_string_buffer(nbytes)
    n = fn(qtype, src.ctypes.data, out, 0, src.shape[0], src.shape[1], None)
    if n != nbytes:
        raise CodemoatError(f"ggml quantised {n} bytes where the tensor holds {nbytes}")
    return out.raw


def _floats(t) -> np.ndarray:  # noqa: ANN001 - a gguf.ReaderTensor
    """A tensor's values as float32, shaped (rows, columns) as numpy reads ggml's (ne1, ne0)."""
    from gguf import quants

    shape = [int(x) for x in reversed(t.shape)]
    return np.asarray(quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32).reshape(shape)


def _encode(t, values: np.ndarray) -> bytes:  # noqa: ANN001
    """`values` in `t`'s own type, `t.n_bytes` long."""
    name = t.tensor_type.name
    if name == "F32":
        return values.astype(np.float32).tobytes()
    if name == "F16":
        return values.astype(np.float16).tobytes()
    if name == "BF16":
        from gguf import quants

        return np.asarray(quants.quantize(values.astype(np.float32), t.tensor_type)).tobytes()
    return _ggml_quantize(int(t.tensor_type), values.reshape(-1, values.shape[-1]), int(t.n_bytes))


def deltas(adapter_path: str) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """{base tensor name: (A, B, scale)} of a GGUF LoRA adapter, A (r, n_in), B (n_out, r) as numpy
    reads them (token_embd's pair is stored flipped: A (n_vocab, r), B (n_embd, r))."""
    import gguf

    r = gguf.GGUFReader(adapter_path)
    field = r.fields.get("adapter.lora.alpha")
    alpha = float(field.parts[field.data[0]][0]) if field is not None else 0.0
    ts = {t.name: _floats(t) for t in r.tensors}
    out = {}
    for name, a in ts.items():
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        b = ts.get(base + ".lora_b")
        if b is None:
            raise CodemoatError(f"the adapter has {name} without its lora_b")
        rank = b.shape[-1]
        out[base] = (a, b, alpha / rank if alpha else 1.0)
    return out


def foldable(base_path: str, adapter_path: str) -> str | None:
    """Why `adapter_path` cannot be folded into `base_path` (None: it can)."""
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(base_path).tensors}
    for name in deltas(adapter_path):
        if name not in types:
            return f"the base has no tensor {name}"
        if types[name] not in FOLDABLE:
            return f"{name} is {types[name]} (adapters are folded into {', '.join(sorted(FOLDABLE))} weights only)"
    return None


def fold(base_path: str, adapter_path: str, name: str = "codemoat-merged") -> MemfdBuffer:
    """A sealed memfd holding the GGUF at `base_path` with the adapter folded into its weights."""
    import gguf

    reader = gguf.GGUFReader(base_path)
    tensors = {t.name: t for t in reader.tensors}
    size = Path(base_path).stat().st_size
    buf = MemfdBuffer(size, name)
    try:
        src = np.memmap(base_path, dtype=np.uint8, mode="r")
        step = 64 << 20
        for at in range(0, size, step):
            buf.write_at(at, memoryview(src[at : at + step]))
        for tname, (a, b, scale) in deltas(adapter_path).items():
            t = tensors.get(tname)
            if t is None:
                raise CodemoatError(f"the adapter changes {tname}, which the base model does not have")
            w = _floats(t)
            delta = a @ b.T if tname == "token_embd.weight" else b @ a  # (n_vocab, n_embd) / (n_out, n_in)
            if delta.shape != w.shape:
                raise CodemoatError(f"the adapter's {tname} has shape {delta.shape}, the base's {w.shape}")
            buf.write_at(int(t.data_offset), _encode(t, w + scale * delta))
        buf.seal()
        return buf
    except BaseException:
        buf.close(zero=True)
        raise


FOLD_MAX_BYTES = 2 << 30  # a base larger than this is not copied per adapter (llama.cpp applies the adapter at run time)


def fold_into_engines(base_path: str, adapters: dict[str, str], make) -> dict[str, object]:  # noqa: ANN001
    """{adapter name: `make(buffer)`, an engine over the base with that adapter folded in} for each
    adapter that can be folded (`foldable`, base up to FOLD_MAX_BYTES); the others are left out, for
    llama.cpp to apply at run time. A failure closes what was built and raises."""
    if not adapters or Path(base_path).stat().st_size > FOLD_MAX_BYTES:
        return {}
    out: dict[str, object] = {}
    try:
        for name, path in adapters.items():
            if foldable(base_path, path) is None:
                out[name] = make(fold(base_path, path, f"codemoat-folded-{name}"))
    except BaseException:
        for e in out.values():
            e.close()  # type: ignore[attr-defined]
        raise
    return out
