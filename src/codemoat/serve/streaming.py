"""Server-sent events (OpenAI, llama.cpp) and NDJSON (Ollama) bodies.

The routes build these once the engine's first chunk is there (`Service.open_stream`), so a request
refused before it (overloaded, prompt too long) gets its status and protocol error as a non-streamed
one does. Errors after the first byte cannot change the status code any more; they are sent in-band
in the protocol's own error shape, then the stream ends.

A stream is written by the request's own task (`EventStream`), and one plain task watches for the client
hanging up, which cancels it (the engine's work with it): the `hangup.Watch` that `Service.open_stream` started
for the wait for the first chunk, so one per streamed request. Starlette's `StreamingResponse` starts a task
group per stream instead: a second task to write it (a turn of the event loop before the first token
goes out) and, when the stream ends, an anyio cancellation that formats the task's repr.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from ..engines.base import PromptTooLong
from ..errors import CodemoatError
from .hangup import WATCH, Watch

log = logging.getLogger("codemoat.serve")


#: an event's JSON text; one encoder for every event (json.dumps with options builds a new one per call)
json_text = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class EventStream(StreamingResponse):
    """A streamed body, written by the request's own task; the client hanging up cancels it (see the module
    docstring) and the response then ends quietly, as Starlette's does."""

    async def __call__(self, scope, receive, send) -> None:
        watch = scope.pop(WATCH, None) or Watch(receive)  # the one `Service.open_stream` started, if any
        try:
            with watch.guard():
                await self.stream_response(send)
        finally:
            watch.stop()
        if self.background is not None:
            await self.background()


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, (CodemoatError, PromptTooLong)):
        return str(exc)
    log.error("stream failed: %s", type(exc).__name__, exc_info=exc)
    return f"internal error ({type(exc).__name__})"


def sse(events: AsyncIterator[dict | str], done_marker: bool = True) -> StreamingResponse:
    """Server-sent events of `events`: dicts, or their JSON text already encoded (`protocol.openai.CompletionChunks`)."""

    async def body():
        try:
            async for ev in events:
                yield f"data: {ev if isinstance(ev, str) else json_text(ev)}\n\n"
        except Exception as e:  # in-band error, OpenAI style
            yield f"data: {json_text({'error': {'message': _error_text(e), 'type': 'server_error'}})}\n\n"
        if done_marker:
            yield "data: [DONE]\n\n"

    return EventStream(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def ndjson(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for ev in events:
                yield json_text(ev) + "\n"
        except Exception as e:  # Ollama sends {"error": ...} as a line
            yield json_text({"error": _error_text(e)}) + "\n"

    return EventStream(body(), media_type="application/x-ndjson")
