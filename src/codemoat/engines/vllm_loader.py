"""codemoat's model loader for vLLM (`load_format="codemoat"`): sealed weights from memory, in the worker.

Registered in every vLLM process by the `vllm.general_plugins` entry point (`register`), since
vLLM spawns its workers and only what a plugin registers exists there. The worker asks the
server's hand-off socket (`model_loader_extra_config["codemoat_socket"]`, a path, no secret) for
the sealed memfd (`engines.vllm_handoff`), maps it read-only, and feeds each safetensors tensor
straight from the mapping into `model.load_weights`; vLLM's `load_model` then runs
`process_weights_after_loading`. No weight byte is written anywhere, and the content key never
reaches this process.
"""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Iterator
from typing import Any

LOAD_FORMAT = "codemoat"
SOCKET_ARG = "codemoat_socket"

_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def safetensors_tensors(view: memoryview, base: int, size: int) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of the safetensors file at view[base : base + size], each a zero-copy view. The header
    is checked by trace.st_io's parser (bounds, hostile JSON): a bad one is one `CodemoatError`."""
    import math

    import torch

    from ..errors import CodemoatError
    from ..trace import st_io

    header, data = st_io.buffer_header(view[base : base + size])
    start = base + data
    for name, info in header.items():
        dtype = getattr(torch, _DTYPES.get(info["dtype"], ""), None)
        if dtype is None:
            raise CodemoatError(f"tensor {name}: dtype {info['dtype']} is not supported")
        lo, hi = info["data_offsets"]
        shape = info["shape"]
        if hi - lo != math.prod(shape) * dtype.itemsize:
            raise CodemoatError(f"tensor {name}: {hi - lo} bytes do not make its shape {shape}")
        if hi == lo:
            yield name, torch.empty(shape, dtype=dtype)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: the loader copies, never writes
            t = torch.frombuffer(view[start + lo : start + hi], dtype=dtype)
        yield name, t.reshape(shape)


def load_from_memfd(model: Any, fd: int, size: int, parts: dict[str, Any]) -> set[str]:
    """Every .safetensors part of the memfd into `model.load_weights`; the mapping is gone afterwards."""
    from ..errors import CodemoatError

    names = sorted(n for n in parts if n.endswith(".safetensors"))
    if not names:
        os.close(fd)
        raise CodemoatError("the sealed model holds no .safetensors file")
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    os.close(fd)
    view = memoryview(mm)
    loaded: set[str] = set()
    try:

        def all_tensors():
            for name in names:
                off, n = parts[name]
                yield from safetensors_tensors(view, int(off), int(n))

        got = model.load_weights(all_tensors())
        loaded |= set(got or ())
    finally:
        import gc

        gc.collect()  # the tensors viewing the mapping go before it closes
        view.release()
        try:
            mm.close()
        except BufferError:  # a view is still held somewhere: the mapping goes with it
            pass
    return loaded


def register() -> None:
    """The `vllm.general_plugins` entry point: make `load_format="codemoat"` known in this process, and
    sealed LoRA adapters load from memory (`engines.vllm_lora`)."""
    from . import vllm_fold, vllm_lora

    vllm_lora.patch_vllm()
    vllm_fold.patch_vllm()
    try:
        from vllm.model_executor.model_loader import register_model_loader
        from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    except ImportError:  # another vLLM layout: codemoat's engine says so when it starts
        return

    @register_model_loader(LOAD_FORMAT)
    class SealedMemfdLoader(BaseModelLoader):
        """Weights from the server's sealed memfd (see the module's text)."""

        def download_model(self, model_config: Any) -> None:
            pass  # nothing to fetch: the weights are in the server's memory

        def load_weights(self, model: Any, model_config: Any) -> None:
            from ..errors import CodemoatError
            from .child import set_non_dumpable
            from .vllm_handoff import fetch

            extra = self.load_config.model_loader_extra_config or {}
            path = extra.get(SOCKET_ARG)
            if not isinstance(path, str):
                raise CodemoatError(f'load_format "{LOAD_FORMAT}" needs model_loader_extra_config["{SOCKET_ARG}"]')
            set_non_dumpable()  # before any plaintext is mapped: no core file, no ptrace by the same uid
            fd, size, parts = fetch(path)
            expected = {name for name, _ in model.named_parameters()}
            loaded = load_from_memfd(model, fd, size, parts)
            missing = expected - loaded if loaded and getattr(model_config, "quantization", None) is None else set()
            if missing:
                raise CodemoatError(f"the sealed weights do not fill the model: {sorted(missing)[:3]} missing")
