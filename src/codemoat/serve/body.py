"""Request-body helpers shared by the routers: the one place a JSON body is parsed and checked."""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
from fastapi import Request

from ..errors import CodemoatError
from .jsontext import SURROGATE_MESSAGE, TooManyObjects, TooManyValues, lone_surrogate
from .usage import Usage, usage_of

#: more JSON values than any client's request holds (a 2,000-message chat is about 6,000): each one
#: becomes a Python object; a million empty `input_extra` entries (4 MiB) took about 3 s of the event
#: loop before this limit
MAX_VALUES = 100_000
#: more JSON objects than any client's request holds (a 2,000-message chat is 2,000, with content
#: parts 4,000): each object in a list the protocol reads becomes a validated model, and pydantic's
#: validation holds the interpreter lock throughout (a worker thread does not help), 2.5-3.5 us an
#: object: 99,999 empty `input_extra` entries cost 0.23-0.3 s before this limit, this many ~30 ms
MAX_OBJECTS = 10_000
#: a body larger than this is parsed and walked on a worker thread, so that other clients' streams
#: move on meanwhile (the walk is Python, which lets go of the lock every few ms); a smaller one
#: (almost every completion) is cheaper to parse here than to hand over
THREAD_BYTES = 64 << 10


async def read_json(request: Request) -> Any:
    """The JSON body, or a 400 in the caller's protocol shape."""
    raw = await request.body()
    if len(raw) > THREAD_BYTES:
        return await anyio.to_thread.run_sync(parse_json, raw)
    return parse_json(raw)


def parse_json(raw: bytes) -> Any:
    """`raw` as a JSON object that is Unicode text, within `MAX_VALUES` and `MAX_OBJECTS`; else a 400."""
    if not raw.strip():
        raise CodemoatError("request body is empty: expected a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise CodemoatError(f"request body is not valid JSON: {msg}") from None
    except ValueError:  # CPython's cap on an int's digits (CVE-2020-10735), a plain ValueError
        raise CodemoatError(
            f"request body is not valid JSON: a number has more than {sys.get_int_max_str_digits():,} digits"
        ) from None
    except RecursionError:  # the decoder's own depth limit: an attacker's [[[[...]]]] is a 400, not a 500
        raise CodemoatError("request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise CodemoatError("request body must be a JSON object")
    check_text(body)
    return body


class NotText(CodemoatError):
    """A JSON body holding a string that is not Unicode text, or more than `MAX_VALUES` values; `body` is
    the parsed document, so that a route can still tell which protocol's error shape to answer in."""

    def __init__(self, message: str, body: Any):
        super().__init__(message)
        self.body = body


def check_text(doc: Any) -> None:
    """Refuse a body holding a string or key that is not Unicode text (`jsontext.lone_surrogate`), or
    more than `MAX_VALUES` values or `MAX_OBJECTS` objects."""
    try:
        bad = lone_surrogate(doc, MAX_VALUES, MAX_OBJECTS)
    except TooManyObjects:
        raise NotText(f"request body holds more than {MAX_OBJECTS:,} JSON objects", doc) from None
    except TooManyValues:
        raise NotText(f"request body holds more than {MAX_VALUES:,} JSON values", doc) from None
    if bad:
        raise NotText(SURROGATE_MESSAGE, doc)


def issue_completion_id(request: Request, path: str | None = None) -> str:
    """A new id for this completion: stored with its usage, so that `POST /v1/events` can name it (only
    by the user it was given to), and sent as `X-Codemoat-Completion-Id` on every route (OpenAI's body
    `id` too). Call it after `Service.prepare`, which may set the prompt headers."""
    from ..protocol.common import new_id

    u = usage_of(request.state)
    u.completion_id = new_id("cmpl")
    if path and not u.language:
        u.language = path  # codemoat.usage maps the extension to a fixed set of languages
    headers = getattr(request.state, "prompt_headers", None) or {}
    request.state.prompt_headers = {**headers, "X-Codemoat-Completion-Id": u.completion_id}
    return u.completion_id


def start_usage(request: Request, protocol: str, model: str) -> Usage:
    """The request's usage record (read by the audit middleware after the response), with its protocol and model."""
    u = usage_of(request.state)
    u.protocol, u.model = protocol, model
    return u
