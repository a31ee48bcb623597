"""OpenAI wire format: /v1/models, /v1/completions, /v1/chat/completions (API reference, 2024-2026)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from .common import CodemoatExt, Lenient, NullIsDefault, now


class CompletionRequest(NullIsDefault):
    model: str
    prompt: str | list[str] = ""
    suffix: str | None = None
    max_tokens: int | None = Field(None, ge=1)  # OpenAI refuses 0 (it was answered with one token)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    echo: bool = False
    user: str | None = None
    codemoat: CodemoatExt | None = None


class ContentPart(Lenient):
    type: str = "text"
    text: str | None = None


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class StreamOptions(NullIsDefault):
    include_usage: bool = False


class ChatRequest(NullIsDefault):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    user: str | None = None
    codemoat: CodemoatExt | None = None


def usage(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    """OpenAI's usage; `cached`: the prompt's tokens read from the cache (`prompt_tokens_details`, left out when unknown)."""
    u: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached is not None:
        u["prompt_tokens_details"] = {"cached_tokens": min(cached, prompt)}
    return u


def completion(id: str, model: str, text: str, finish: str | None, u: dict | None, extra: dict | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": id,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
    if u is not None:
        body["usage"] = u
    if extra:
        body.update(extra)
    return body


class CompletionChunks:
    """A stream's events without a finish reason, as JSON text: `completion(id, model, text, None, None)`, or with
    `chat` `chat_chunk(id, model, {"content": text}, None)`, encoded by `encode`, byte for byte, with the parts
    that never change within a stream encoded once."""

    def __init__(self, id: str, model: str, encode: Callable[[Any], str], chat: bool = False):
        self.encode = encode
        kind, text = ("chat.completion.chunk", '"delta":{"content":') if chat else ("text_completion", '"text":')
        self.head = '{"id":' + encode(id) + ',"object":"' + kind + '","created":'
        self.middle = ',"model":' + encode(model) + ',"choices":[{"index":0,' + text
        self.tail = ("}" if chat else "") + ',"logprobs":null,"finish_reason":null}]}'

    def __call__(self, text: str) -> str:
        return f"{self.head}{now()}{self.middle}{self.encode(text)}{self.tail}"


def chat(id: str, model: str, text: str, finish: str, u: dict, extra: dict | None = None) -> dict[str, Any]:
    body = {
        "id": id,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}],
        "usage": u,
    }
    if extra:
        body.update(extra)
    return body


def chat_chunk(
    id: str, model: str, delta: dict, finish: str | None, u: dict | None = None, choices: bool = True
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else [],
    }
    if u is not None:
        body["usage"] = u
    return body


def model_card(id: str, created: int) -> dict[str, Any]:
    return {"id": id, "object": "model", "created": created, "owned_by": "codemoat"}


def model_list(ids: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(i, created) for i in ids]}


def error(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
