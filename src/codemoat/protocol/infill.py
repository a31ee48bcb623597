"""llama.cpp server's /infill (tools/server/README.md): prefix, suffix and cross-file `input_extra`."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .common import INT32_MAX, CodemoatExt, Lenient


class ExtraFile(Lenient):
    filename: str = ""
    text: str = ""


class InfillRequest(Lenient):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraFile] = Field(default_factory=list)
    prompt: str = ""  # llama.cpp appends it after the prefix (the current line's start)
    model: str | None = None
    n_predict: int | None = Field(None, ge=-1)
    temperature: float = Field(0.8, ge=0, le=2)
    top_k: int = Field(40, ge=0, le=INT32_MAX)  # llama.cpp's is an int32: 2**32 read as 0 (off)
    top_p: float = Field(0.95, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    # editors' line rules (llama.vscode sends both): stop at the next newline once this many ms
    # have passed since the first generated token (0: no limit), and stop at a line indented less
    t_max_predict_ms: float = Field(0, ge=0, allow_inf_nan=False)  # echoed in generation_settings: JSON has no Infinity
    n_indent: int = Field(0, ge=0)
    codemoat: CodemoatExt | None = None


def generation_settings(
    model: str,
    n_ctx: int,
    n_predict: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repeat_penalty: float,
    stop: list[str],
    seed: int | None,
    n_indent: int,
    t_max_predict_ms: float,
    stream: bool,
) -> dict[str, Any]:
    """The settings the generation ran with (llama.vscode reads `n_ctx`)."""
    return {
        "n_ctx": n_ctx,
        "n_predict": n_predict,
        "model": model,
        "seed": -1 if seed is None else seed,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": 0.0,
        "repeat_penalty": repeat_penalty,
        "stop": stop,
        "n_indent": n_indent,
        "t_max_predict_ms": t_max_predict_ms,
        "stream": stream,
    }


def timings(
    prompt_n: int, prompt_ms: float, predicted_n: int, predicted_ms: float, cache_n: int | None = None
) -> dict[str, float]:
    """llama.cpp server's `timings` (per-token milliseconds and tokens per second derived as it does): `prompt_n` the
    prompt tokens evaluated, `cache_n` those found in the cache (when the engine says; all were evaluated otherwise)."""
    cache_n = min(cache_n or 0, prompt_n)
    prompt_n -= cache_n
    return {
        "cache_n": cache_n,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": 1e3 * prompt_n / prompt_ms if prompt_ms else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": 1e3 * predicted_n / predicted_ms if predicted_ms else 0.0,
    }


def result(
    model: str,
    content: str,
    stop: bool,
    prompt_n: int,
    predicted: int,
    stop_type: str,
    extra: dict | None = None,
    settings: dict | None = None,
    times: dict | None = None,
    truncated: bool = False,
) -> dict[str, Any]:
    """The answer (or a stream's last event); `tokens_cached` is what the KV cache holds after it
    (llama.cpp's `n_past`): the prompt and the generated tokens."""
    body = {
        "content": content,
        "stop": stop,
        "model": model,
        "tokens_predicted": predicted,
        "tokens_evaluated": prompt_n,
        "stop_type": stop_type,
        "stopping_word": "",
        "generation_settings": settings or {},
        "timings": times or {},
        "tokens_cached": prompt_n + predicted,
        "truncated": truncated,
        "has_new_line": "\n" in content,
    }
    if extra:
        body.update(extra)
    return body


def error(message: str, code: int, type_: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "type": type_}}
