"""llama.cpp server's /infill (tools/server/README.md): prefix, suffix and cross-file `input_extra`."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .common import CodemoatExt, Lenient


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
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    codemoat: CodemoatExt | None = None


def result(model: str, content: str, stop: bool, prompt_n: int, predicted: int, stop_type: str, extra: dict | None = None) -> dict[str, Any]:
    body = {
        "content": content, "stop": stop, "model": model, "tokens_predicted": predicted,
        "tokens_evaluated": prompt_n, "stop_type": stop_type,
    }
    if extra:
        body.update(extra)
    return body


def error(message: str, code: int, type_: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "type": type_}}
