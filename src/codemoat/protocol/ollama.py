"""Ollama wire format: /api/tags, /api/show, /api/generate, /api/chat (Ollama docs/api.md).

Streaming is NDJSON and on by default. Continue's autocomplete calls /api/show, enables FIM
when the returned `template` mentions `.Suffix`, then sends /api/generate with `suffix` and `raw`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import Field

from .common import INT32_MAX, CodemoatExt, Lenient, NullIsDefault


class Options(NullIsDefault):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT32_MAX)  # llama.cpp's is an int32: 2**32 read as 0 (off)
    num_predict: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    repeat_penalty: float | None = Field(None, allow_inf_nan=False)


class GenerateRequest(NullIsDefault):
    model: str
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: Options = Field(default_factory=Options)
    codemoat: CodemoatExt | None = None


class Message(Lenient):
    role: str
    content: str = ""


class ChatRequest(NullIsDefault):
    model: str
    messages: list[Message] = Field(default_factory=list)  # none: preload the model (Ollama's "load")
    stream: bool = True
    options: Options = Field(default_factory=Options)
    codemoat: CodemoatExt | None = None


class ShowRequest(Lenient):
    model: str | None = None
    name: str | None = None  # older clients


def timestamp() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def generate_chunk(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "created_at": timestamp(), "response": text, "done": False}


def _done(reason: str, prompt_n: int, eval_n: int, total_ns: int, extra: dict | None) -> dict[str, Any]:
    """The closing fields a final /api/generate and /api/chat object share."""
    body = {
        "done": True,
        "done_reason": reason,
        "total_duration": total_ns,
        "load_duration": 0,
        "prompt_eval_count": prompt_n,
        "prompt_eval_duration": 0,
        "eval_count": eval_n,
        "eval_duration": total_ns,
    }
    return body | (extra or {})


def generate_final(
    model: str, text: str, reason: str, prompt_n: int, eval_n: int, total_ns: int, extra: dict | None = None
) -> dict[str, Any]:
    return {"model": model, "created_at": timestamp(), "response": text, **_done(reason, prompt_n, eval_n, total_ns, extra)}


def chat_chunk(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "created_at": timestamp(), "message": {"role": "assistant", "content": text}, "done": False}


def chat_final(
    model: str, text: str, reason: str, prompt_n: int, eval_n: int, total_ns: int, extra: dict | None = None
) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    return {"model": model, "created_at": timestamp(), "message": message, **_done(reason, prompt_n, eval_n, total_ns, extra)}


def details(family: str, quant: str, params: str) -> dict[str, Any]:
    """A model's `details`, as /api/tags and /api/show give them."""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": params,
        "quantization_level": quant,
    }


def model_entry(name: str, size: int, digest: str, family: str, quant: str, params: str, modified: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": modified,
        "size": size,
        "digest": digest,
        "details": details(family, quant, params),
    }


# Ollama's own Go-template convention for FIM-capable models; Continue looks for `.Suffix`.
FIM_TEMPLATE = "{{- if .Suffix }}<fim_prefix>{{ .Prompt }}<fim_suffix>{{ .Suffix }}<fim_middle>{{- else }}{{ .Prompt }}{{- end }}"


def error(message: str) -> dict[str, Any]:
    return {"error": message}
