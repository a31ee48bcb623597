"""Build the configured engine from a plaintext path or a decrypted buffer, supervised or in-process.

Plaintext and sealed models take the same road: `engine_class(settings.model.engine)` with the
same options (`engine_options`). With `model.isolation = "process"` (the default) an engine that
can (llama.cpp) runs in a supervised child process (`engines.supervised`), so a native crash
costs a restart instead of the server; the transformers and vLLM engines stay in-process. Inline
(`model.isolation = "inline"`), such an engine's worker thread is watched (`engines.watchdog.InlineWatch`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import Settings
from . import engine_class
from .base import Engine
from .memfd import MemfdBuffer


def engine_options(settings: Settings, model_id: str) -> dict[str, Any]:
    """The keywords every engine's `from_path`/`from_buffer` takes."""
    m = settings.model
    opts = {"model_id": model_id, "n_ctx": m.n_ctx, "n_threads": m.n_threads, "n_gpu_layers": m.n_gpu_layers}
    if m.engine == "vllm":
        opts.update(tensor_parallel_size=m.tensor_parallel_size, kv_cache_gib=m.kv_cache_gib, enforce_eager=m.enforce_eager)
        opts["fold_adapters"] = m.fold_adapters  # engines.vllm_fold
    return opts


def build_engine(
    settings: Settings, source: Path | MemfdBuffer, model_id: str, parts: Mapping[str, tuple[int, int]] | None = None
) -> Engine:
    """The engine for `source`; it owns a `MemfdBuffer` source from here (and zeroes it at close)."""
    try:
        cls = engine_class(settings.model.engine)
    except BaseException:
        if isinstance(source, MemfdBuffer):
            source.close(zero=True)
        raise
    opts = engine_options(settings, model_id)
    if cls.name == "llamacpp":  # continuous batching (engines.batch)
        opts.update(
            parallel=settings.model.parallel, batch_tokens=settings.model.batch_tokens, cpu_buffers=settings.model.cpu_buffers
        )
        if settings.model.adapters:
            opts["fold_adapters"] = settings.model.fold_adapters  # engines.merge
    served: tuple = ()
    if settings.model.adapters:  # LoRA adapters (codemoat tune, or vendor update:NAME); which request gets one is serve's choice
        from .adapters import open_adapters

        try:
            served = tuple(open_adapters(settings.model.adapters, cls.name, source, parts))
            # llama.cpp opens each GGUF by path; vLLM hands each safetensors memfd to its workers (engines.vllm_lora)
            opts["adapters"] = {a.name: (a.fd, a.peft_config) if cls.name == "vllm" else a.path for a in served}
        except BaseException:
            if isinstance(source, MemfdBuffer):
                source.close(zero=True)
            raise
    if settings.model.isolation == "process" and cls.isolatable:
        from .supervised import SupervisedEngine

        engine: Engine = SupervisedEngine.start(cls, source, opts, settings.model.answer_timeout_s, settings.model.spin_timeout_s)
    elif isinstance(source, MemfdBuffer):
        engine = cls.from_buffer(source, parts, **opts)
    else:
        engine = cls.from_path(source, **opts)
    if settings.model.isolation == "inline" and cls.isolatable and hasattr(engine, "watch"):
        # the process engine's watchdogs over its worker thread instead (engines.watchdog.InlineWatch)
        engine.watch(settings.model.answer_timeout_s, settings.model.spin_timeout_s, settings.model.exit_on_hang)
    # the adapters this engine loaded: serve chooses among them per request (an adapter swap builds a new engine)
    engine.adapters_served = served  # type: ignore[attr-defined]
    return engine
