"""Server-sent events (OpenAI, llama.cpp) and NDJSON (Ollama) bodies.

The routes build these once the engine's first chunk is there (`Service.open_stream`), so a request
refused before it (overloaded, prompt too long) gets its status and protocol error as a non-streamed
one does. Errors after the first byte cannot change the status code any more; they are sent in-band
in the protocol's own error shape, then the stream ends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from ..engines.base import PromptTooLong
from ..errors import CodemoatError

log = logging.getLogger("codemoat.serve")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, (CodemoatError, PromptTooLong)):
        return str(exc)
    log.error("stream failed: %s", type(exc).__name__, exc_info=exc)
    return f"internal error ({type(exc).__name__})"


def sse(events: AsyncIterator[dict], done_marker: bool = True) -> StreamingResponse:
    async def body():
        try:
            async for ev in events:
                yield f"data: {_dumps(ev)}\n\n"
        except Exception as e:  # in-band error, OpenAI style
            yield f"data: {_dumps({'error': {'message': _error_text(e), 'type': 'server_error'}})}\n\n"
        if done_marker:
            yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def ndjson(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for ev in events:
                yield _dumps(ev) + "\n"
        except Exception as e:  # Ollama sends {"error": ...} as a line
            yield _dumps({"error": _error_text(e)}) + "\n"

    return StreamingResponse(body(), media_type="application/x-ndjson")
