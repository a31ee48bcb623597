"""Errors as values of each protocol: one place maps a failure to the shape its client expects."""

from __future__ import annotations

import html
import json
import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from ..engines.base import PromptTooLong
from ..errors import CodemoatError, Overloaded, RateLimited
from ..protocol import infill, ollama, openai, tabby
from .hangup import ClientGone

log = logging.getLogger("codemoat.serve")

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}
_OPENAI_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded", 503: "model_unavailable"}


def _openai_type(status: int) -> str:
    return _OPENAI_TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500 else "server_error")


def completions_protocol(raw: bytes, doc: Any = None, parsed: bool = False) -> str:
    """Whose shapes a POST /v1/completions answers in: Tabby's and OpenAI's share the path. A body parsed (`doc`,
    `parsed`) is Tabby's when it is an object naming "segments"; one not parsed, yet (a 401 comes before the parse)
    or at all (not JSON), when its bytes name it."""
    if parsed:
        return "tabby" if isinstance(doc, dict) and "segments" in doc else "openai"
    return "tabby" if b'"segments"' in raw else "openai"


def protocol_of(request: Request) -> str:
    """openai | ollama | infill | tabby | plain (set by the handler once the body is known)."""
    return getattr(request.state, "protocol", None) or protocol_of_path(request.url.path)


def protocol_of_path(path: str) -> str:
    """Whose shapes an answer on `path` takes when nothing but its path is known (POST /v1/completions: OpenAI's)."""
    if path.startswith("/api/"):
        return "ollama"
    if path.startswith("/infill"):
        return "infill"
    if path in ("/v1/health", "/v1/events"):
        return "tabby"
    if path.startswith("/v1/"):
        return "openai"
    return "plain"


def render(
    request: Request, status: int, message: str, code: str | None = None, headers: dict | None = None, param: str | None = None
) -> JSONResponse:
    h = dict(headers or {})
    if status == 401:
        h.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(error_body(protocol_of(request), status, message, code, param), status_code=status, headers=h)


def error_body(proto: str, status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    """The error object of protocol `proto` (`protocol_of`)."""
    if proto == "ollama":
        return ollama.error(message)
    if proto == "infill":  # llama.cpp's server: a 503 is its "unavailable_error"
        return infill.error(message, status, "unavailable_error" if status == 503 else _openai_type(status))
    if proto == "tabby":
        return tabby.error(message)
    if proto == "openai":
        return openai.error(message, _openai_type(status), code or _OPENAI_CODES.get(status), param)
    return {"error": message}


def raw_answer(status: int, reason: str, message: str, path: str | None = None, code: str | None = None) -> bytes:
    """A whole HTTP/1.1 error answer, `Connection: close`, for what the HTTP layer refuses before any route sees the
    request (`serve.readguard`): JSON in the shape of `path`'s protocol, OpenAI's when no path is known (the shape
    editors' plugins most widely parse). A plain-text body there broke the plugins that read every error as JSON."""
    proto = "openai" if path is None else protocol_of_path(path)
    body = json.dumps(error_body(proto, status, message, code), ensure_ascii=False, separators=(",", ":")).encode()
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode() + body


def _console_page(path: str) -> bool:
    """Whether `path` is one of the console's HTML pages (under /admin), not its JSON API (/admin/api)."""
    return (path == "/admin" or path.startswith("/admin/")) and not (path == "/admin/api" or path.startswith("/admin/api/"))


def console_error(status: int, message: str, headers: dict | None = None) -> Response:
    """An HTTP error on a console page, in HTML under the console's headers (CSP, no framing) and with a way back: a
    mistyped /admin address, or a GET of a form's address, answered a browser with a JSON body."""
    from ..console.web import secure

    body = f'<!doctype html><title>{status}</title><p>{html.escape(message)}.</p><p><a href="/admin">The console</a></p>'
    return secure(HTMLResponse(body, status_code=status, headers=headers))


def render_exception(request: Request, exc: Exception) -> Response:
    """Any exception as the caller's protocol error; unexpected ones are logged without request text."""
    if isinstance(exc, (RateLimited, Overloaded)):  # 429 / 503, each with when to retry
        return render(request, exc.status, str(exc), exc.code, {"Retry-After": str(max(1, int(exc.retry_after + 0.999)))})
    if isinstance(exc, ClientDisconnect):  # gone mid-body: recorded as the hang-up it is (499), no traceback
        exc = ClientGone("the client closed the connection before its request body was complete")
    if isinstance(exc, CodemoatError):
        # an error with no code of its own has OpenAI's null code (its type says invalid_request_error)
        code = None if exc.code == CodemoatError.code else exc.code
        return render(request, exc.status, str(exc), code, param=_context_param(request) if code == _CONTEXT else None)
    if isinstance(exc, PromptTooLong):
        return render(request, 400, str(exc), _CONTEXT, param=_context_param(request))
    if isinstance(exc, (RequestValidationError, ValidationError)):
        first = exc.errors()[0] if exc.errors() else {}
        return render(request, 400, validation_message(exc), openai_code(first), param=param_of(first.get("loc", ())) or None)
    if isinstance(exc, json.JSONDecodeError):  # OpenAI: null code and param for a body it cannot parse
        return render(request, 400, f"request body is not valid JSON: {exc.msg} at position {exc.pos}")
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code in (404, 405) and _console_page(request.url.path):
            return console_error(exc.status_code, "no such page" if exc.status_code == 404 else str(exc.detail), exc.headers)
        if exc.status_code in (404, 405) and protocol_of(request) == "openai":
            # no such route (not a missing model): OpenAI's own words for it
            return render(request, exc.status_code, f"Invalid URL ({request.method} {request.url.path})")
        return render(request, exc.status_code, str(exc.detail))
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeout)):
        # the shared database (PostgreSQL behind replicas) is down or restarting, or every pooled connection stayed
        # busy past the pool's timeout: a retryable 503; the pool reconnects by itself when it is back (pool_pre_ping)
        log.warning("database unreachable on %s: %s", request.url.path, type(getattr(exc, "orig", None) or exc).__name__)
        return render(request, 503, "the shared database is unreachable; try again shortly", "database_unavailable")
    log.error("internal error on %s: %s", request.url.path, type(exc).__name__, exc_info=exc)
    return render(request, 500, f"internal error ({type(exc).__name__})", "internal_error")


def validation_message(exc: RequestValidationError | ValidationError) -> str:
    errs = exc.errors()
    parts = []
    for e in errs[:3]:
        parts.append(f"{param_of(e.get('loc', ())) or 'body'}: {e.get('msg')}")
    more = f" (+{len(errs) - 3} more)" if len(errs) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more


_CONTEXT = "context_length_exceeded"


def _context_param(request: Request) -> str:
    """What OpenAI names as too long: the chat's `messages`, a completion's `prompt`."""
    return "messages" if request.url.path.endswith("/chat/completions") else "prompt"


def param_of(loc: tuple) -> str:
    """A validation error's location as OpenAI writes `param`: `messages[0].role`. Pydantic's own steps
    (`body`, a union member such as `str` or `list[ContentPart]`) are left out."""
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif x != "body" and x not in _PYDANTIC_STEPS and not any(c in x for c in "[]-"):
            out += f".{x}" if out else x
    return out


_PYDANTIC_STEPS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def openai_code(err: dict) -> str:
    """OpenAI's `code` for a pydantic error (the codes its API answers invalid parameters with)."""
    kind, value = err.get("type", ""), err.get("input")
    number = "integer" if isinstance(value, int) else "decimal"
    if kind == "missing":
        return "missing_required_parameter"
    if kind in ("greater_than", "greater_than_equal"):
        return f"{number}_below_min_value"
    if kind in ("less_than", "less_than_equal"):
        return f"{number}_above_max_value"
    if kind == "too_short":
        return "empty_array" if not value else "array_below_min_length"
    if kind == "too_long":
        return "array_above_max_length"
    if kind.endswith(("_type", "_parsing")):
        return "invalid_type"
    return "invalid_value"


def install(app) -> None:
    async def handler(request: Request, exc: Exception):
        return render_exception(request, exc)

    # Starlette answers a handler for `Exception` in its outermost layer and then re-raises, so uvicorn
    # logs a traceback and closes the connection: an unreachable database (an expected 503, many at
    # once while PostgreSQL restarts) is answered in the inner layer like the other expected errors.
    for kind in (
        CodemoatError,
        PromptTooLong,
        RequestValidationError,
        ValidationError,
        json.JSONDecodeError,
        StarletteHTTPException,
        OperationalError,
        InterfaceError,
        PoolTimeout,
        ClientDisconnect,
        Exception,
    ):
        app.add_exception_handler(kind, handler)
