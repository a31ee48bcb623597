"""Loading a GGUF into llama-cpp-python: the full model (its context capped at the model's training context,
llama.cpp's CPU buffers chosen by `cpu.choose`) or its vocabulary alone, each failing in one line that names the file."""

from __future__ import annotations

from typing import Any

from ..errors import CodemoatError


def _cannot_load(name: str) -> CodemoatError:
    return CodemoatError(
        f"cannot load model {name}: llama.cpp cannot read it (not a GGUF model, truncated, "
        "or an architecture this llama.cpp does not know)"
    )


def load_vocab(model_path: str, name: str | None = None):
    """A vocab-only `llama_cpp.Llama` (tokenizer and metadata, no weights); one line naming the file if it cannot load."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    try:
        # a vocab-only load reads no hyperparameters, so llama.cpp warns that any context exceeds
        # a training context of 0: noise, held back here
        with suppress_stdout_stderr(disable=False):
            return llama_cpp.Llama(model_path=model_path, vocab_only=True, verbose=False)
    except (ValueError, RuntimeError, OSError):
        raise _cannot_load(name or model_path) from None


def training_context(metadata: dict[str, Any], default: int) -> int:
    """The context length a GGUF model was trained with (`<arch>.context_length`), else `default`."""
    arch = metadata.get("general.architecture", "llama")
    try:
        return int(metadata.get(f"{arch}.context_length", 0)) or default
    except ValueError:
        return default


def load_llama(model_path: str, name: str | None = None, *, use_extra_bufts: bool | None = None, progress=None, **kw: Any):
    """A full `llama_cpp.Llama` with `n_ctx` capped at the model's training context (a larger one
    makes llama.cpp warn of a training context overflow on every load); one line naming the file if it cannot load.
    `use_extra_bufts` (llama.cpp's AMX/repacked CPU buffers): None lets `cpu.choose` decide (a self-test
    for a quantised model, cached per CPU and build). `progress`: llama.cpp's load progress callback."""
    import llama_cpp

    from .cpu import choose, extra_bufts

    if use_extra_bufts is None:
        use_extra_bufts = choose("auto", model_path, n_threads=kw.get("n_threads")).use_extra_bufts
    probe = load_vocab(model_path, name)
    train_ctx = training_context(probe.metadata, kw.get("n_ctx", 512))
    probe.close()
    kw["n_ctx"] = min(kw.get("n_ctx", 512), train_ctx)
    kw["n_batch"] = min(kw.get("n_batch", 512), kw["n_ctx"])
    try:
        with extra_bufts(use_extra_bufts, progress):
            return llama_cpp.Llama(model_path=model_path, verbose=False, **kw)
    except (ValueError, RuntimeError, OSError):
        raise _cannot_load(name or model_path) from None
