"""Request-body helpers shared by the routers."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from ..errors import CodemoatError


async def read_json(request: Request) -> Any:
    """The JSON body, or a 400 in the caller's protocol shape."""
    raw = await request.body()
    if not raw.strip():
        raise CodemoatError("request body is empty: expected a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise CodemoatError(f"request body is not valid JSON: {msg}") from None
    except RecursionError:  # the decoder's own depth limit: an attacker's [[[[...]]]] is a 400, not a 500
        raise CodemoatError("request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise CodemoatError("request body must be a JSON object")
    return body


def start_usage(request: Request, protocol: str, model: str) -> dict[str, Any]:
    """The per-request usage record the audit middleware reads after the response."""
    u = getattr(request.state, "usage", None)
    if u is None:
        u = {}
        request.state.usage = u
    u.update(protocol=protocol, model=model)
    u.setdefault("prompt_tokens", 0)
    u.setdefault("completion_tokens", 0)
    u.setdefault("repos", [])
    u.setdefault("snippets", [])
    return u
