"""Pieces shared by the wire formats."""

from __future__ import annotations

import secrets
import time

from pydantic import BaseModel, ConfigDict, Field, model_validator


INT32_MAX = 2**31 - 1  # llama.cpp's int parameters (top_k)


class Lenient(BaseModel):
    """Request bodies accept (and ignore) fields we do not use, as the reference servers do."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class NullIsDefault(Lenient):
    """A field that has a default, sent as JSON null, takes that default: OpenAI documents its parameters as "or
    null" (`"temperature": null` is the default temperature), and Ollama's Go server reads null into its optional
    fields (`"stream": null`, `"options": null`). Required fields stay required (`"model": null` is refused)."""

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: object) -> object:
        if isinstance(data, dict) and None in data.values():
            fields = cls.model_fields
            return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}
        return data


class CodemoatExt(Lenient):
    """codemoat's extension field on completion and chat requests (all optional).

    `repo`/`path` (or `git_url` + `path`) name the file being edited so that retrieval can add
    cross-file context; `repos` names repositories to ground a chat answer in;
    `return_snippets` echoes the retrieved snippets in the response.
    """

    repo: str | None = None
    path: str | None = None
    git_url: str | None = None
    repos: list[str] = Field(default_factory=list)
    return_snippets: bool = False
    retrieval: bool = True


def new_id(prefix: str) -> str:
    """`prefix-` and 24 random hex digits (96 bits; a uuid4's first 24 digits held 92 and cost ~5x as much)."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def as_stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]
