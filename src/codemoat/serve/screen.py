"""The secret screen (`policy.secrets = "block"`): an authenticated POST whose body holds a secret
is refused with 400 in the caller's protocol, whatever the route, before any route reads it.

Order and cost are the point. The caller is authenticated first (the same bearer parsing as the
routes): a body from someone without a valid token is never read here, so scanning cannot be
turned into an anonymous CPU drain; the route then answers 401. An authenticated body is scanned
in bounded time: every string of the JSON document (or the body as text when it is not JSON) up
to `SCAN_CHARS` characters in all; a string longer than what is left is scanned at both ends, where
an editor puts the code around the cursor. The prompt a model actually sees is screened whole
where it is assembled (`prompts.screen_text`); this screen is what holds for routes that take text but
build no prompt (Tabby's events), and for the parts of a body no prompt uses.

The kinds found (never the values) go into the request's audit record, written by the audit
middleware around this one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
from starlette.requests import Request

from ..audit.redact import find_secrets, screen
from ..errors import CodemoatError
from . import errors
from .auth import principal_of
from .usage import usage_of

# At ~0.3 s per MB of code on one core (find_secrets, measured here), 256 Ki characters cost
# ~80 ms at most per request; the body itself is bounded by server.max_body_mb before this.
SCAN_CHARS = 256 * 1024


class SecretScreen:
    """Pure ASGI middleware (inside the audit middleware, outside the routes)."""

    def __init__(self, app, policy: str):
        self.app, self.policy = app, policy
        self.limiter = anyio.CapacityLimiter(2)  # scans queue here rather than crowd the audit and engine threads

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or self.policy != "block":
            return await self.app(scope, receive, send)
        principal = await anyio.to_thread.run_sync(principal_of, scope)
        if principal is None:  # no valid token: the route refuses it (401) without reading the body
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["principal"] = principal
        body, receive = await _read(receive)
        kinds, message = await anyio.to_thread.run_sync(scan_body, body, limiter=self.limiter)
        if not kinds:
            return await self.app(scope, receive, send)
        usage = usage_of(scope["state"])
        usage.secrets |= kinds
        usage.note = "refused: secret in the request"
        if scope.get("path") == "/v1/completions":  # Tabby's body or OpenAI's: refused in its own shape, as the route would
            scope["state"]["protocol"] = await anyio.to_thread.run_sync(_completions_protocol, body, limiter=self.limiter)
        await errors.render(Request(scope), 400, message, "secret_detected")(scope, receive, send)


async def _read(receive):
    """The whole body (already bounded by `BodyLimit`), and a `receive` that replays it to the app."""
    chunks, more = [], True
    while more:
        m = await receive()
        if m["type"] != "http.request":
            break
        chunks.append(m.get("body", b""))
        more = m.get("more_body", False)
    body = b"".join(chunks)
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def _completions_protocol(body: bytes) -> str:
    try:
        return errors.completions_protocol(body, json.loads(body), parsed=True)
    except (ValueError, RecursionError):
        return errors.completions_protocol(body)


def scan_body(body: bytes, limit: int = SCAN_CHARS) -> tuple[set[str], str]:
    """The secret kinds in a body's text (at most `limit` characters scanned), and the one-line
    refusal that names them with their lines (empty when none)."""
    try:
        texts: Iterator[str] = _strings(json.loads(body)) if body else iter(())
    except (ValueError, RecursionError):  # not JSON, or nested past the decoder's limit: screen it as text
        texts = iter((body.decode("utf-8", "replace"),))
    kinds: set[str] = set()
    message = ""
    for text in _bounded(texts, limit):
        found = find_secrets(text)
        if found and not message:
            try:
                screen(text, "block")
            except CodemoatError as e:  # the same one-line message a screened prompt gives
                message = str(e)
        kinds.update(f.kind for f in found)
    return kinds, message


def _bounded(texts: Iterator[str], limit: int) -> Iterator[str]:
    left = limit
    for t in texts:
        if left <= 0:
            return
        if len(t) > left:
            half = left // 2
            yield t[:half]
            yield t[len(t) - (left - half) :]
            return
        left -= len(t)
        yield t


def _strings(doc: Any) -> Iterator[str]:
    """Every string in a JSON document (keys too), in order, without recursion."""
    todo = [doc]
    while todo:
        d = todo.pop()
        if isinstance(d, str):
            yield d
        elif isinstance(d, dict):
            for k, v in reversed(list(d.items())):
                todo.append(v)
                todo.append(k)
        elif isinstance(d, list):
            todo.extend(reversed(d))
