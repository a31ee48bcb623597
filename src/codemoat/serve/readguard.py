"""How long and how much a client may take to send a request: bounds uvicorn does not set.

uvicorn (0.54, httptools) closes a connection idle *between* requests after `timeout_keep_alive`, but
sets no deadline on a request itself: a connection opened and left silent, a head sent a byte at a
time or stopped halfway, or a body cut short of its Content-Length (or a chunked one never ended) was
held for good, a descriptor and a buffer each. A few hundred such connections from one address used
every descriptor a process under systemd's default limit (1,024) has, and from then on `codemoat serve`
or the key server refused everyone. Nor does it bound a request's head: one header line of 300 MiB was
read into memory whole (the key server's RSS grew by 430 MB).

Here, a request's bytes are due from the moment the connection opens (or its first byte arrives after
an answer): within `read_timeout_s`, plus a second for every `MIN_RATE` bytes received, so a large body
on a slow link still arrives while a trickle or a stall does not hold the connection. Those seconds are
not banked past `read_timeout_s` ahead: a body sent fast and then stopped is cut as soon as any other
stall is (before, 8 MiB at once bought a silence of 2.3 hours). Past that the
client gets `408` in one line and the connection closes; a head larger than `MAX_HEAD` gets `431`, however its
bytes arrive: cut off once past the bound while it arrives, or, one that ends in the same read as it grew past it
(a whole head in one read, or one pipelined behind a request), measured when it ends: only when the reads it came
in could hold more than `MAX_HEAD` (an addition and a comparison per request), then by what llhttp parsed of it (the
URL, each header's name and value, their separators; whitespace before a value, which llhttp drops, not counted).
A refusal the client would take for the answer to an earlier request (pipelined, still unanswered) is not sent:
the connection just closes.
While the server itself is answering on the connection or has stopped reading it (flow control,
pipelining), the clock waits. The app sees a client gone (`http.disconnect`), as when one hangs up.

Nor did uvicorn keep a chunked body's trailers apart: each trailer line was appended to the request's headers,
the very list its app had read (a token in a trailer named the caller of a request no route had authenticated, in
its audit record), and without bound, the head's bound being past (500 KB of 3-byte trailers added 100,000 entries).
Here trailers are dropped unread (`_Trailers`), and their bytes count as a head's: past `MAX_HEAD`, `431`. They count
from the read after the last chunk's size line, not from the first whole trailer: httptools gathers a trailer's line
until it ends, so a first trailer that never ended was read into memory whole (60 MiB sent, +94 MB RSS).

Nor does uvicorn bound the requests a client pipelines (sends before reading the answers): it queues
each one read while another is answered, and reads on whenever the app waits on `receive()` (as a
hang-up watch does), so one connection that sent `GET /livez` over and over without reading grew
`codemoat serve` by 1.3 GB in 20 s, for good. Here a connection with more than `MAX_PIPELINED`
requests waiting is closed.

Nor does the deadline cover the other direction: an answer waits for the client to read it, so a client
that sent requests and read nothing, its TCP window shut, held the connection for good (the answers in
the server's buffers, the request's task in `drain()`, and a `close()` waiting for the buffers to
empty). Here each connection's TCP_USER_TIMEOUT is `read_timeout_s`: the kernel resets a connection
whose sent data stays unacknowledged, or whose peer's window stays shut, that long (zero-window probes
count since Linux 5.11). A client reading an answer, however slowly, opens its window and is not cut.

Nor did llhttp (strict as uvicorn sets it) frame a request as RFC 9112 has a server do: one of HTTP/1.1 with no Host
header, or any with two, was served (section 3.2: 400), and `Transfer-Encoding: gzip, chunked` (or `identity,
chunked`, or `,chunked`) was read as chunked, the codings before it ignored. A proxy in front that reads such a head
otherwise (the body as gzip's, or framed by a Content-Length) and the server then disagree on where a request ends:
the bytes one takes for a body the other serves as a second, hidden request (request smuggling). Here a request's
head is checked once parsed, from the header list uvicorn's `on_header` keeps (one pass over it, no re-parse): a Host
missing (HTTP/1.1) or repeated gets 400, and a Transfer-Encoding other than a single `chunked` gets 501 (a coding not
implemented, section 6.1) or 400 (a list that is not one). llhttp itself refuses Transfer-Encoding beside a
Content-Length, and `chunked` twice, with 400. An HTTP/1.0 request with a Transfer-Encoding, whose framing section 6.1
calls faulty (HTTP/1.0 has no chunked coding: a proxy may go by a Content-Length or read to the close), was read as
chunked: 400 now, as nginx answers it. Each refusal here closes the connection, and none reaches an app.

Each refusal at this layer is counted by status, per server (`refused`): `RefusedCollector` shows the counts as
`codemoat_http_refused_total{status="..."}` in a Prometheus registry (`codemoat serve`'s /metrics: serve/run.py). Before, such a
refusal left no trace at all: no route, so no audit record, and no metric.

`raise_open_files()` lifts the soft limit on open descriptors to the hard one (as Go's runtime does):
with the deadline, holding them all then takes thousands of new connections a second.
"""

from __future__ import annotations

import logging
import resource
import socket
import sys
from typing import Any

from prometheus_client.core import CounterMetricFamily
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# imported here, not at the first refusal: by then every descriptor may be taken (the attack refused), and an
# import that cannot open its file would leave each connection held
from .errors import raw_answer

#: every request's head: browsers' and editors' run to a few KiB (nginx 32 KiB, h11 16 KiB by default)
MAX_HEAD = 64 << 10
#: requests read on a connection and waiting behind the one being answered (HTTP/1.1 pipelining; browsers,
#: editors, httpx and HAProxy send one at a time); past this the connection is closed
MAX_PIPELINED = 32
#: the slowest a request is allowed to arrive once its first `read_timeout_s` have passed
MIN_RATE = 1024  # bytes a second
READ_TIMEOUT_S = 30.0


#: a transfer-coding's name (RFC 9110 section 5.6.2's token), parameters after a ";" not checked
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _coding_refusal(value: bytes) -> tuple[int, str, str]:
    """The refusal of a request whose Transfer-Encoding (its lines joined by commas) is not a single `chunked`."""
    names = [part.split(b";", 1)[0].strip() for part in value.split(b",")]
    if not all(names) or any(not _TCHAR.issuperset(n) for n in names):
        return 400, "Bad Request", "Transfer-Encoding is not a list of transfer codings (RFC 9112 section 6.1)"
    return (
        501,
        "Not Implemented",
        "only Transfer-Encoding: chunked, alone, is implemented here: send the body chunked, or with a Content-Length",
    )


class _Refused(Exception):
    """Raised in an llhttp callback once the request is refused: the parser stops there (uvicorn then calls
    `send_400_response`, which writes nothing more to a closing transport)."""


class _Trailers:
    """What uvicorn's `on_header` appends to once a request's head is parsed (`ReadGuard.on_headers_complete`):
    the request's trailers, dropped, their bytes counted as a head's: past `MAX_HEAD`, 431 (the first also makes the
    reads that follow count, for a trailer that does not end). Iterated, it is the head's headers still (uvicorn's
    `_get_upgrade` reads them after an upgrade request's head)."""

    __slots__ = ("guard", "head", "size")

    def __init__(self, guard: ReadGuard) -> None:
        self.guard, self.head, self.size = guard, [], 0

    def append(self, header: tuple[bytes, bytes]) -> None:
        g = self.guard
        if not g._in_head:  # this message's first
            g._in_head, g._head, self.size = True, 0, 0
        self.size += len(header[0]) + len(header[1]) + 3
        if self.size > MAX_HEAD:
            g._refuse(431, "Request Header Fields Too Large", f"request trailers are larger than {MAX_HEAD:,} bytes")
            raise _Refused

    def __iter__(self):
        return iter(self.head)


class _Quiet:
    """uvicorn's logger for one connection, with its WARNING for each request it cannot parse at debug: anyone,
    without a token, could add a line to the log per malformed request (the answer, a 400, is unchanged)."""

    __slots__ = ("_log",)

    def __init__(self, log: logging.Logger) -> None:
        self._log = log

    def warning(self, msg: object, *args: object, **kw: object) -> None:
        kw.setdefault("stacklevel", 2)  # the record names uvicorn's line, not this one
        (self._log.debug if msg == "Invalid HTTP request received." else self._log.warning)(msg, *args, **kw)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)


class ReadGuard:
    """Mixed in before an `HttpToolsProtocol`: the deadline and head bound of the module's docstring."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)  # type: ignore[call-arg]
        self.logger = _Quiet(self.logger)  # type: ignore[has-type]
        self._trailers = _Trailers(self)

    read_timeout_s: float = READ_TIMEOUT_S
    refused: dict[int, int] = {}  # requests refused here, by status: each `guarded` class has its own
    _timer: Any = None
    _reading = False  # a request's bytes are due
    _deadline = 0.0  # when they are late: read_timeout_s after they became due (moved on while the server answers
    # or does not read), a second later for every MIN_RATE bytes received, never more than read_timeout_s ahead
    _in_head = True  # what arrives now is a request's head
    _head = 0  # its bytes so far (each read that began in a head, counted whole)
    _first = 0  # the bytes of the read the message being read began in
    _begun = False  # a message has begun and is not complete
    _upgrade_left = 0  # bytes of an upgrade request's body still to come (`_unsupported_upgrade_warning`)
    _chunk_wait = False  # a chunk's size line is read and none of its data yet: the data, or the last chunk's trailers
    _arrived = b""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:  # a client that takes none of its answers for read_timeout_s is reset by the kernel
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(self.read_timeout_s * 1000)))
            except (OSError, AttributeError):  # not Linux: the answers wait, as uvicorn's do
                pass
        self._due()

    def connection_lost(self, exc) -> None:
        self._not_due()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if not self._reading and (self.cycle is None or self.cycle.response_complete):
            self._due()  # bytes after an answer (uvicorn's keep-alive timer is off from here)
        if self._reading:
            self._deadline = min(self._deadline + len(data) / MIN_RATE, self.loop.time() + self.read_timeout_s)
        if self._upgrade_left:
            return self._upgrade_body(data)
        if self._in_head:
            self._head += len(data)
        trailing = self._chunk_wait
        self._arrived = data  # what an upgrade request's body starts in (`_unsupported_upgrade_warning`)
        super().data_received(data)  # type: ignore[misc]
        self._arrived = b""
        if trailing and self._chunk_wait and not self._in_head:  # a whole read after a size line and no data: trailers
            self._in_head, self._head, self._trailers.size = True, len(data), 0
        if self._in_head and self._head > MAX_HEAD and not self.transport.is_closing():
            self._refuse(431, "Request Header Fields Too Large", f"request head is larger than {MAX_HEAD:,} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()  # type: ignore[misc]
        self._begun = True  # uvicorn's `url` is this message's from here (`_path`)
        self._first = len(self._arrived)
        if not self._reading:
            self._due()

    def on_chunk_header(self) -> None:
        self._chunk_wait = True

    def on_body(self, body: bytes) -> None:
        self._chunk_wait = False
        super().on_body(body)  # type: ignore[misc]

    def on_headers_complete(self) -> None:
        # the head came in the read it began in and those counted since (`_head`): under the bound, it is
        if self._head + self._first > MAX_HEAD and self._parsed_head() > MAX_HEAD:
            self._refuse(431, "Request Header Fields Too Large", f"request head is larger than {MAX_HEAD:,} bytes")
            raise _Refused  # llhttp stops at it: nothing of the request reaches the app, nor anything after it
        hosts, coding = 0, None  # the framing rules of the module's docstring: one pass over the header list
        for name, value in self.headers:  # type: ignore[attr-defined]  # uvicorn's, names lower-case
            if name == b"host":
                hosts += 1
            elif name == b"transfer-encoding":
                coding = value if coding is None else coding + b"," + value
        if hosts != 1:  # none is allowed to HTTP/1.0 (and 0.9) only: 1.1, and whatever llhttp reads as later, need one
            version = self.parser.get_http_version()  # type: ignore[attr-defined]
            if hosts or version not in ("1.0", "0.9"):
                self._refuse(
                    400, "Bad Request", f"an HTTP/{version} request needs one Host header (RFC 9112 section 3.2); it has {hosts}"
                )
                raise _Refused
        if coding is not None:
            version = self.parser.get_http_version()  # type: ignore[attr-defined]
            if version in ("1.0", "0.9"):  # its framing is faulty (RFC 9112 section 6.1): a proxy may read a Content-Length
                self._refuse(
                    400,
                    "Bad Request",
                    f"an HTTP/{version} request cannot carry a Transfer-Encoding (RFC 9112 section 6.1): send its body "
                    "with a Content-Length, or the request as HTTP/1.1",
                )
                raise _Refused
            if coding.strip().lower() != b"chunked":
                self._refuse(*_coding_refusal(coding))
                raise _Refused
        self._in_head, self._head = False, 0
        super().on_headers_complete()  # type: ignore[misc]
        self._trailers.head, self.headers = self.headers, self._trailers  # the scope keeps the head's own list
        if len(self.pipeline) > MAX_PIPELINED:  # the newest is dropped unread, and the connection with it
            self.pipeline.popleft()
            self._not_due()
            if not self.transport.is_closing():
                self.transport.close()

    def _parsed_head(self) -> int:
        """The bytes of the head just parsed, at the least: "M URL HTTP/1.1", each "name:value" line, and the CRLFs."""
        headers = self.headers  # type: ignore[attr-defined]  # uvicorn's: this request's, as parsed
        return len(self.url) + 15 + sum(len(n) + len(v) for n, v in headers) + 3 * len(headers) + 2

    def handle_websocket_upgrade(self) -> None:
        self._not_due()  # the connection is the WebSocket protocol's from here
        super().handle_websocket_upgrade()  # type: ignore[misc]

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn logs a WARNING for every request that asks to upgrade to anything but a WebSocket (`curl --http2`
        over http:// sends `Upgrade: h2c`), and answers it as HTTP/1.1 anyway: anyone, without a token, could add a
        line to the log per request. Logged at debug.

        llhttp takes the bytes after an upgrade's head for the new protocol, so a body sent with one never reached
        the app, which answered as if it had been sent none ("request body is empty"; an outside fuzzer's
        `curl --http2 -d ...`). A body of a Content-Length is handed to the app here instead (`_upgrade_body`), as
        RFC 9113 lets a server ignore h2c, and the connection closes after the answer (the parser is past an
        upgrade). A chunked one is refused: its app, started already, reads a hang-up."""
        self.logger.debug("Unsupported upgrade request.")  # type: ignore[attr-defined]
        headers = dict(self.headers)  # type: ignore[attr-defined]  # this request's, names lower-case (uvicorn)
        length = headers.get(b"content-length", b"0").strip()
        self._in_head = False  # the head is read: `_refuse` tells the request's app the client is gone
        if b"transfer-encoding" in headers:
            self._refuse(
                400,
                "Bad Request",
                "a request that asks to upgrade its connection (Upgrade: h2c) cannot carry a chunked body here: send "
                "it with a Content-Length, or as plain HTTP/1.1 without Upgrade (curl: --http1.1)",
            )
        elif length not in (b"", b"0"):
            cycle = self.cycle
            cycle.more_body, cycle.keep_alive = True, False  # uvicorn's on_message_complete had called it whole
            self._upgrade_left = int(length)  # llhttp has checked it is a number
            self._due()
            offset = sys.exc_info()[1].args[0]  # type: ignore[union-attr]  # HttpParserUpgrade: where the head ended
            self._upgrade_body(self._arrived[offset:])
        else:
            self._in_head = True
            rest = self._arrived[sys.exc_info()[1].args[0] :]  # type: ignore[union-attr]
            if rest:  # a request pipelined behind it in the same read: llhttp stopped at the upgrade, and the bytes
                # were dropped (the client waited for an answer until the idle close). Fed again on the next turn,
                # not from here: one read of many such requests would nest a call per request
                self.loop.call_soon(self._after_upgrade, rest)

    def _after_upgrade(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.data_received(data)

    def _upgrade_body(self, data: bytes) -> None:
        """Bytes of an upgrade request's body (`_unsupported_upgrade_warning`), to its app as uvicorn's on_body does;
        any after it are dropped, as the connection closes after the answer."""
        cycle, take = self.cycle, data[: self._upgrade_left]
        self._upgrade_left -= len(take)
        if not (cycle.response_complete or cycle.disconnected):
            cycle.body += take
            cycle.more_body = self._upgrade_left > 0
            cycle.message_event.set()
            if len(cycle.body) > HIGH_WATER_LIMIT:
                self.flow.pause_reading()
        if not self._upgrade_left:
            self._not_due()
            self._in_head, self._head = True, 0

    def on_message_complete(self) -> None:
        super().on_message_complete()  # type: ignore[misc]
        self._not_due()
        self._in_head, self._head, self._begun, self._chunk_wait = True, 0, False, False

    # -- the clock -------------------------------------------------------------------------------------
    def _due(self) -> None:
        self._reading, self._deadline = True, self.loop.time() + self.read_timeout_s
        self._arm(self.read_timeout_s)

    def _not_due(self) -> None:
        self._reading = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, self._check)

    def _check(self) -> None:
        self._timer = None
        if not self._reading or self.transport.is_closing():
            return
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.response_started and not cycle.response_complete):
            self._due()  # the server is answering here or not reading: the client is not the one late
            return
        left = self._deadline - self.loop.time()
        if left > 0:
            self._arm(left)
            return
        self._refuse(
            408,
            "Request Timeout",
            f"request not received in time: it is due within {self.read_timeout_s:g} s, then at {MIN_RATE:,} bytes a second",
            answer=self._in_head or cycle is None or not cycle.response_started,
        )

    def send_400_response(self, msg: str) -> None:
        """A request llhttp cannot parse: uvicorn's 400, in JSON (`_refuse`); none after a refusal of our own."""
        if self.transport.is_closing():
            return
        self._refuse(400, "Bad Request", "invalid HTTP request: it cannot be parsed as HTTP/1.1")

    def _refuse(self, status: int, reason: str, text: str, answer: bool = True) -> None:
        self._not_due()
        self.refused[status] = self.refused.get(status, 0) + 1  # the server's class's own (`guarded`)
        cycle = self.cycle
        # the request refused has reached its app (its body, or its trailers, were arriving)
        mine = cycle is not None and cycle.scope is self.scope and (self._begun or not self._in_head)
        if mine and not cycle.response_complete:
            cycle.disconnected = True  # the app's request: it reads a hang-up and writes nothing more
            cycle.message_event.set()
        # answered unless its app has begun its answer, or a request before it (pipelined) is unanswered, whether its
        # head was refused or its body or trailers, its request queued (`pipeline`): the client would take the
        # refusal for that earlier request's answer
        if mine:
            answerable = not cycle.response_started and all(c is not cycle for c, _ in self.pipeline)
        else:
            answerable = cycle is None or cycle.response_complete
        if answer and answerable:
            self.transport.write(raw_answer(status, reason, text, self._path()))
        self.transport.close()

    def _path(self) -> str | None:
        """The path of the request refused, where known: its route's, or the start of its URL once read (a head
        refused while it arrives), so that the answer takes that protocol's shape (`errors.raw_answer`)."""
        cycle = self.cycle
        if not self._in_head and cycle is not None and not cycle.response_complete:
            return cycle.scope.get("path")
        url = self.url if self._begun else b""  # uvicorn's: the URL's bytes read so far, reset at each message's start
        if not url.startswith(b"/"):
            return None  # none yet, or a proxy's absolute form
        return url.split(b"?", 1)[0].decode("latin-1")


def guarded(base: type[HttpToolsProtocol] = HttpToolsProtocol, read_timeout_s: float = READ_TIMEOUT_S) -> type:
    """`base` (uvicorn's httptools protocol or a subclass) with `ReadGuard`'s bounds: `uvicorn.Config(http=...)`."""
    return type(f"Guarded{base.__name__}", (ReadGuard, base), {"read_timeout_s": float(read_timeout_s), "refused": {}})


class RefusedCollector:
    """The refusals of a `guarded` protocol's server as a Prometheus counter, read when scraped:
    `registry.register(RefusedCollector(protocol))`."""

    def __init__(self, protocol: type[ReadGuard]) -> None:
        self.refused = protocol.refused

    def describe(self):
        return []

    def collect(self):
        c = CounterMetricFamily(
            "codemoat_http_refused",
            "Requests the HTTP layer refused before any route saw them (unparseable, Host, framing, slow, too large), by status.",
            labels=["status"],
        )
        for status, n in sorted(self.refused.items()):
            c.add_metric([str(status)], n)
        yield c


def raise_open_files() -> None:
    """The soft limit on open descriptors up to the hard one (at most 2**20); quietly as it was if not allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard if hard != resource.RLIM_INFINITY else 1 << 20, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        pass
