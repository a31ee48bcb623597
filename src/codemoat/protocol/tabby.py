"""Tabby's completion API (tabby/crates/tabby/src/services/completion.rs, /v1/health, /v1/events).

Same path as OpenAI's `/v1/completions`; a body with `segments` is Tabby's.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .common import Lenient


class Declaration(Lenient):
    filepath: str = ""
    body: str = ""


class Snippet(Lenient):
    filepath: str = ""
    body: str = ""
    score: float | None = None


class Segments(Lenient):
    prefix: str = ""
    suffix: str | None = None
    filepath: str | None = None
    git_url: str | None = None
    declarations: list[Declaration] | None = None
    relevant_snippets_from_changed_files: list[Snippet] | None = None
    relevant_snippets_from_recently_opened_files: list[Snippet] | None = None
    clipboard: str | None = None


class DebugOptions(Lenient):
    raw_prompt: str | None = None
    return_snippets: bool = False
    return_prompt: bool = False
    disable_retrieval_augmented_code_completion: bool = False


class CompletionRequest(Lenient):
    language: str | None = None
    segments: Segments
    user: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = None
    mode: str | None = None
    debug_options: DebugOptions | None = None


def completion(id: str, text: str, debug: dict | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": id, "choices": [{"index": 0, "text": text}]}
    if debug is not None:
        body["debug_data"] = debug
    return body


def health(model: str, chat_model: str | None, version: str, cpu_count: int) -> dict[str, Any]:
    return {
        "model": model,
        "chat_model": chat_model,
        "device": "cpu",
        "arch": "x86_64",
        "cpu_info": "",
        "cpu_count": cpu_count,
        "accelerators": [],
        "cuda_devices": [],
        "version": {"build_date": "", "build_timestamp": "", "git_sha": "", "git_describe": f"codemoat-{version}"},
    }


def error(message: str) -> dict[str, Any]:
    return {"error": message}
