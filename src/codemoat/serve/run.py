"""Running the app: the listening socket and uvicorn, with the signal handling a service manager expects."""

from __future__ import annotations

import gc
import signal
import socket

from ..errors import CodemoatError


BACKLOG = 2048  # uvicorn's default, which it passes to listen() again when it starts serving


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket listening on `host:port` (0 picks a free port), or a one-line error.

    Listening, not only bound: `serve` takes its port before it loads the model (minutes), and with
    SO_REUSEADDR a second socket may bind a port whose first is bound but not yet listening (Linux), so a
    second `codemoat serve` on the same port started meanwhile was not refused; it loaded its model too,
    and uvloop then ignored its failed listen(): it said "serving" and answered nothing, with no error.
    Connections made while the model loads wait in the backlog and are answered once it is up."""
    # proto=IPPROTO_TCP so that asyncio sets TCP_NODELAY on accepted connections (with proto 0 it
    # does not, and Nagle + delayed ACKs add ~40 ms to every small response); set on the listener too.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except (OSError, TypeError, ValueError) as e:  # TypeError: a host name IDNA cannot encode, or holding NUL
        sock.close()
        from ..config.serving import netloc  # "[::1]:8080": "::1:8080" reads as another host and port

        raise CodemoatError(f"cannot listen on {netloc(host, port)}: {getattr(e, 'strerror', None) or e}") from None
    return sock


def freeze_heap() -> None:
    """Move every object start-up made (the model's libraries: ~640k objects with vLLM imported) out of
    the cyclic collector's sight, as `vllm serve` does. Otherwise every full collection walks them all
    and holds the event loop for 0.3-1 s, every client with it (py-spy, codemoat serve over vLLM at 32
    clients: one such stall in 18 s, 12 % of the server's busy samples); it then scans only what
    requests allocate."""
    gc.collect()
    gc.freeze()


def believed(trusted: list[str]) -> list[str]:
    """server.trusted_proxies as uvicorn is to match peers against: each IPv4 entry also in its IPv4-mapped
    IPv6 form, which is how a listener on '::' (dual-stack) sees an IPv4 peer ('::ffff:10.0.0.5')."""
    import ipaddress

    out = []
    for item in trusted:
        net = ipaddress.ip_network(item, strict=False)
        out.append(item)
        if net.version == 4:
            out.append(f"::ffff:{net.network_address}/{96 + net.prefixlen}")
    return out


def run(app, sock: socket.socket, log_level: str, trusted_proxies: list[str] | None = None, read_timeout_s: float = 30.0) -> None:
    """Serve `app` on `sock` until SIGTERM or SIGINT; requests in flight get 10 s to finish.

    A request is due within `read_timeout_s` (server.read_timeout_s) and its head bounded (`serve.readguard`),
    and the soft limit on open descriptors is lifted to the hard one.

    X-Forwarded-For is read only from `trusted_proxies` (server.trusted_proxies). uvicorn's own default
    trusts it from 127.0.0.1 (or $FORWARDED_ALLOW_IPS): any local process, or a proxy on the host that
    passes the client's header through, would then pick the address that audit records and the
    per-address bounds see."""
    import uvicorn

    from .readguard import RefusedCollector, guarded, raise_open_files
    from .wire import HttpProtocol

    raise_open_files()
    protocol = guarded(HttpProtocol, read_timeout_s)
    trust = getattr(app.state, "trust", None)
    if trust is not None:  # /metrics: requests the HTTP layer refused before any route (and any audit record) saw them
        trust.metrics.registry.register(RefusedCollector(protocol))
    proxies = {"proxy_headers": bool(trusted_proxies), "forwarded_allow_ips": believed(trusted_proxies or []) or None}
    config = uvicorn.Config(
        app,
        http=protocol,
        # no WebSocket route: an upgrade to one is answered as the HTTP/1.1 request it also is, in its route's JSON,
        # where uvicorn's WebSocket protocol refused it with a bodiless text/plain 403 and two log lines per request
        ws="none",
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
        **proxies,
    )
    server = uvicorn.Server(config)
    freeze_heap()  # the model is loaded and the app built: what follows is serving
    # uvicorn drains requests on SIGTERM/SIGINT, then re-raises the signal under the handler it
    # found at start; a quiet handler here makes a graceful stop exit 0, as service managers expect.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
