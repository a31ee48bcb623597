"""The key server's HTTP face: three JSON routes over `codemoat.vault.keyserver.KeyServer`.

    POST /v1/lease/challenge  {"license_id", "client_nonce"}     -> {"nonce", "expires_in", "license_id", "client_nonce",
                                                                     "signature"}
    POST /v1/lease            {license_id, machine_id, nonce, client_time, signature} -> {"lease", "signature"}
    POST /v1/lease/release    same shape as /v1/lease            -> {"released": true}
    GET  /health

A refusal answers `{"error": {code, message, license_id, machine_id, nonce, server_time}, "signature"}`
with the status the key server chose, signed like a lease, so plain HTTP on loopback or behind a
TLS terminator is safe against tampering and replay of grants and refusals alike. Bodies over
`MAX_BODY` bytes get 413 before they are read whole, JSON nested deeper than `MAX_DEPTH` gets
400 before it is parsed (a lease request is one flat object), and so does a string with a lone
surrogate ("\\ud800" or its raw bytes: a str that cannot be encoded, so no lookup or answer could
use it; the check is `serve.jsontext`, shared with the FastAPI routers). An unknown route (404), a
wrong method (405) and a vendor database that cannot be reached (503, `database_unavailable`, retried
by clients) are signed refusals in the same shape.

A plain ASGI app, not FastAPI: four fixed routes of raw JSON need no router, dependency injection or
response models, and through FastAPI the framework cost as much server CPU per lease as the lease
itself (bench/results/attest.md). `app.state.keyserver` is the `KeyServer` it serves.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ..vault.clock import Clock
from ..vault.keyserver import KeyServer, LeaseDenied
from ..vault.vendor import Vendor
from .jsontext import SURROGATE_MESSAGE, lone_surrogate

log = logging.getLogger("codemoat.serve")

MAX_BODY = 16 * 1024  # a lease request is about 400 bytes
MAX_DEPTH = 8
_JSON = (b"content-type", b"application/json")
_NOT_FOUND = LeaseDenied("not_found", "no such route on the key server", 404)
_NOT_ALLOWED = LeaseDenied("method_not_allowed", "method not allowed on this route", 405)


class _Refused(Exception):
    def __init__(self, err: LeaseDenied):
        self.err = err


def too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """True when `raw` nests arrays or objects deeper than `limit` (brackets inside strings do not count)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:  # every real request: one flat object
        return False
    depth, in_str, esc = 0, False, False
    for c in raw:
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:  # backslash
                esc = True
            elif c == 0x22:  # quote
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif c in (0x5D, 0x7D):
            depth -= 1
    return False


def _too_large() -> _Refused:
    return _Refused(LeaseDenied("too_large", f"request body over {MAX_BODY} bytes", 413))


async def _body(scope: dict, receive: Any) -> Any:
    """The parsed JSON body, or `_Refused` with 413 (too large) or 400 (not JSON, too deep)."""
    for name, value in scope["headers"]:
        if name == b"content-length" and (not value.isdigit() or int(value) > MAX_BODY):
            raise _too_large()
    raw, more = b"", True
    while more:
        msg = await receive()
        if msg["type"] != "http.request":  # the client went away
            raise _Refused(LeaseDenied("bad_request", "request body was cut short", 400))
        raw += msg.get("body", b"")
        more = msg.get("more_body", False)
        if len(raw) > MAX_BODY:
            raise _too_large()
    if too_deep(raw):
        raise _Refused(LeaseDenied("bad_request", f"JSON nested deeper than {MAX_DEPTH} levels", 400))
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise _Refused(LeaseDenied("bad_request", "body is not JSON", 400)) from None
    if lone_surrogate(body):  # "\ud800", or its raw bytes: a str no UTF-8 encoder takes
        raise _Refused(LeaseDenied("bad_request", SURROGATE_MESSAGE, 400))
    return body


def _get(body: Any, key: str) -> Any:
    return body.get(key) if isinstance(body, dict) else None


async def _send(send: Any, status: int, content: Any, *extra: tuple[bytes, bytes]) -> None:
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    headers = [_JSON, (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class KeyServerApp:
    """The ASGI app: POST routes to `KeyServer` methods, GET /health, lifespan acknowledged."""

    def __init__(self, vendor: Vendor, clock: Clock | None = None):
        ks = KeyServer(vendor, clock)
        self.state = SimpleNamespace(keyserver=ks)
        self._health = {"status": "ok", "keyserver_key": vendor.keyserver_key_b64}
        self._routes = {
            "/v1/lease/challenge": lambda b: ks.challenge(_get(b, "license_id"), _get(b, "client_nonce")),
            "/v1/lease": ks.lease,
            "/v1/lease/release": ks.release,
        }

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":  # no WebSocket route: refused at the handshake (403), not a 500 and a log line
            await receive()  # websocket.connect
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        ks: KeyServer = self.state.keyserver
        # no route, or not its method: a signed refusal in the protocol's shape like every other error
        if path == "/health":
            if method in ("GET", "HEAD"):
                return await _send(send, 200, self._health)
            return await _send(send, 405, ks.refusal(_NOT_ALLOWED, None), (b"allow", b"GET"))
        fn = self._routes.get(path)
        if fn is None:
            return await _send(send, 404, ks.refusal(_NOT_FOUND, None))
        if method != "POST":
            return await _send(send, 405, ks.refusal(_NOT_ALLOWED, None), (b"allow", b"POST"))
        body: Any = None
        try:
            body = await _body(scope, receive)
            # Inline, not in a thread pool: the work is a millisecond of CPU (signatures, a local
            # SQLite transaction), and a thread hop costs more than it saves on a single process.
            answer = fn(body)
        except _Refused as e:
            return await _send(send, e.err.status, ks.refusal(e.err, None))
        except LeaseDenied as e:
            return await _send(send, e.status, ks.refusal(e, body))
        except (OperationalError, InterfaceError, PoolTimeout) as e:  # PoolTimeout: every connection busy
            # the vendor database (PostgreSQL behind several key servers) is down or restarting: a signed,
            # retryable 503 at once and one line in the log, not a 500 and a traceback (as serve.errors does)
            log.warning("key server: database unreachable on %s: %s", path, type(getattr(e, "orig", None) or e).__name__)
            down = LeaseDenied("database_unavailable", "the key server's database is unreachable; try again shortly", 503)
            return await _send(send, 503, ks.refusal(down, body))
        await _send(send, 200, answer)


def create_app(vendor: Vendor, clock: Clock | None = None) -> KeyServerApp:
    """An app serving leases for `vendor`'s licenses."""
    return KeyServerApp(vendor, clock)


def serve_workers(vendor_dir: str, workers: int, host: str, port: int, read_timeout_s: float = 30.0, **uvicorn_opts: Any) -> None:
    """`codemoat keyserver --workers N`: N processes, each with a listening socket of its own on `host:port`
    (SO_REUSEPORT), so the kernel spreads connections over them by their addresses. uvicorn's own `--workers`
    shares one socket, whose accepts the first worker awake takes: a burst of 32 connections went all 32 to one
    worker in 4 of 5 tries, and two workers served like one (bench/results/attest.md). Stops them all on
    SIGTERM or SIGINT, and when one of them exits (the others are stopped, the exit status is 1). Each bounds
    how long a client takes to send a request (`serve.readguard`, `read_timeout_s`)."""
    import multiprocessing
    import signal
    import threading

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(vendor_dir, host, port, read_timeout_s, uvicorn_opts)) for _ in range(workers)]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    for p in procs:
        p.start()
    try:
        while not stop.is_set() and all(p.is_alive() for p in procs):
            stop.wait(0.2)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # uvicorn's own SIGTERM handling: a graceful shutdown
        for p in procs:
            p.join(15)
    if not stop.is_set():
        raise SystemExit(1)


def _worker(vendor_dir: str, host: str, port: int, read_timeout_s: float, uvicorn_opts: dict[str, Any]) -> None:
    import socket

    import uvicorn

    from .readguard import guarded, raise_open_files

    raise_open_files()

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # only processes of this user may join the port
    try:
        sock.bind((host, port))
    except OSError as e:
        from ..config.serving import netloc

        raise SystemExit(f"key server worker: cannot listen on {netloc(host, port)}: {e.strerror}") from None
    app = create_app(Vendor.open(vendor_dir))
    config = uvicorn.Config(app, host=host, port=port, http=guarded(read_timeout_s=read_timeout_s), **uvicorn_opts)
    uvicorn.Server(config).run(sockets=[sock])
