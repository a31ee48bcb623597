"""The audit middleware: one audit record per API request, written after its response has finished.

Before handling a request it checks that the audit log can be written, and refuses with 503 if
not. A complete (non-streamed) response is held until its record is written, and replaced by a
503 if that fails, so nothing is served unaudited; a stream is recorded when it ends, before its
last (empty) body message is sent, so the client's next request does not run beside that write
(at one client it added ~2 ms to the next request's time to first token). A stream whose record
the log does not take when it ends was delivered all the same: its record is kept and written once the
log takes records again (`late`). A request cut off by a disconnect or by shutdown is recorded as 499, as
is a whole answer whose client is gone by the time it is ready (the HTTP layer says so: `wire.CLIENT_GONE`),
and shutdown waits (up to 15 s) for those records. A stream whose client hangs up keeps the status its head was
sent with (200: the client got it, and the tokens before the hang-up), and its record says it was cut: the note
"client gone after N tokens", N its completion_tokens (`streaming.EventStream`). Probes (`PROBES`) are recorded only when refused (a
wrong token on them is a guess worth seeing); their answers are never held. Requests without a valid token are tallied
per source by `Trust.write` rather than recorded one by one (see `failures.py`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import anyio
from sqlalchemy.exc import DBAPIError
from starlette.requests import Request

from ..audit.log import AuditUnavailable
from . import errors
from .usage import usage_of
from .wire import CLIENT_GONE

if TYPE_CHECKING:
    from .trust import Trust

log = logging.getLogger("codemoat.audit")

#: the note of a whole answer whose client hung up (or whose connection was cut) before it could be sent: such an
#: answer was recorded with the status it would have had (a 200 the client never got), its record written first
GONE_BEFORE_ANSWER = "client gone before its answer was sent"

PROBES = frozenset({"/health", "/livez", "/metrics", "/v1/health"})


class AuditMiddleware:
    """Pure ASGI (see the module docstring)."""

    def __init__(self, app, trust: Trust):
        self.app = app
        self.trust = trust

    async def __call__(self, scope, receive, send):
        t = self.trust
        if scope["type"] == "lifespan":
            return await self.app(scope, self._drain_before_shutdown(receive), send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("path") in PROBES:
            return await self._probe(scope, receive, send)
        t.log.keeper.touch()  # the state stays known between an editor's keystrokes (`audit.probe`)
        if not t.log.known_writable and not await anyio.to_thread.run_sync(t.log.check_writable, limiter=t.limiter):
            t.metrics.audit_failures.inc()
            return await self._refuse(scope, receive, send)
        if len(t.late) or t.late.doubts:  # the log takes records again: what it did not take goes first (`late`)
            t.late.start()
        usage_of(scope.setdefault("state", {}))
        t0 = time.perf_counter()
        status = 500
        held: dict | None = None
        streaming = False
        written = False
        refused = False

        async def record(note: str | None = None, withheld: bool = False) -> bool:
            nonlocal written
            written = True
            try:
                with anyio.CancelScope(shield=True):  # a client that went away is still audited
                    # a stream was delivered as it came: a record the log does not take now is kept (`late`);
                    # a whole answer is `withheld` if not: its record is looked up later, in case it committed
                    seconds = time.perf_counter() - t0
                    await t.write_async(scope, status, seconds, note, late_ok=streaming, withheld=withheld)
                return True
            except (AuditUnavailable, DBAPIError):  # DBAPIError: the database went away while naming the caller
                t.metrics.audit_failures.inc()
                return False

        async def send_wrapper(message):
            nonlocal status, held, streaming, refused
            if message["type"] == "http.response.start":
                status = message["status"]
                held = message
                return
            if message["type"] == "http.response.body" and not streaming and held is not None:
                if not message.get("more_body", False):  # the whole response: record it before it leaves
                    gone = scope.get(CLIENT_GONE)
                    if gone is not None and gone():  # nothing will reach the client: not recorded as what it got
                        status = 499
                        await record(GONE_BEFORE_ANSWER)  # then sent to nobody: the HTTP layer writes nothing
                    elif not await record(withheld=True):
                        refused = True
                        return await self._refuse(scope, receive, send)
                    start, held = held, None
                    await send(start)
                    return await send(message)
                streaming = True
                start, held = held, None
                await send(start)
            if streaming and message["type"] == "http.response.body" and not message.get("more_body", False) and not written:
                await record()  # the stream's end waits for its record (see the module docstring)
            if not refused:
                await send(message)

        t.in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as e:
            if not written:
                cancelled = isinstance(e, anyio.get_cancelled_exc_class())
                if cancelled and not streaming:
                    status = 499  # as nginx logs it: the client went away, or the server is stopping
                elif not streaming:  # nothing reached the client; the server answers 500
                    status = 500
                await record("cancelled (client gone or server stopping)" if cancelled else f"{type(e).__name__} while handling")
            raise
        finally:
            t.in_flight -= 1
        if not written:
            if held is not None:  # a start without a body (not ASGI-conformant, but finish it properly)
                if not await record(withheld=True):
                    return await self._refuse(scope, receive, send)
                await send(held)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:  # a stream that ended (or a client that went away mid-stream)
                await record()

    async def _probe(self, scope, receive, send) -> None:
        """A health or metrics probe: answered as is; recorded only when refused (401/403)."""
        status = 0

        async def watched(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        t0 = time.perf_counter()
        await self.app(scope, receive, watched)
        if status in (401, 403):
            try:
                await anyio.to_thread.run_sync(
                    self.trust.write, scope, status, time.perf_counter() - t0, None, limiter=self.trust.limiter
                )
            except AuditUnavailable:
                self.trust.metrics.audit_failures.inc()

    def _drain_before_shutdown(self, receive):
        """Hold the lifespan's shutdown until requests still in flight (cancelled by the server
        stopping) have written their records, at most 15 s."""

        async def wrapped():
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                with anyio.move_on_after(15):
                    while self.trust.in_flight > 0:
                        await anyio.sleep(0.05)
                if self.trust.in_flight:
                    log.error("%d requests still in flight at shutdown: their audit records may be missing", self.trust.in_flight)
                late = self.trust.late
                if len(late) or late.doubts:  # records the log did not take (`late`): a last try, else each on a line
                    try:
                        with anyio.move_on_after(5):
                            await late.drain()
                    except Exception:
                        log.exception("the last try to write the audit records the log did not take failed")
                    finally:
                        late.give_up()
            return message

        return wrapped

    async def _refuse(self, scope, receive, send) -> None:
        why = self.trust.log.failure or "unknown error"
        log.error("refusing a request: the audit log cannot be written (%s)", why)
        resp = errors.render(
            Request(scope),
            503,
            "service unavailable: the audit log cannot be written, and codemoat serves nothing it cannot audit",
            "audit_unavailable",
        )
        await resp(scope, receive, send)
