"""The egress guard: a Python audit hook (PEP 578) that refuses outbound destinations.

Armed at `serve` start, it sees every `socket.connect` (and `connect_ex`, which raises the same
event), `sendto`/`sendmsg` with an address, and every name or address lookup
(`getaddrinfo`, `gethostbyname`, `gethostbyaddr`, `getnameinfo`), and raises `EgressBlocked`
before the operation happens unless the destination is loopback or allow-listed. Lookups are
guarded too because a DNS query is itself a way out (names can carry data to a resolver): no name
is resolved unless it is allow-listed, or exactly `localhost` (names under `.localhost` reach the
resolver like any other, RFC 6761 notwithstanding, and a resolver may answer them with any address).

Allow-list entries: `host`, `host:port`, `[v6addr]:port`, or a network in CIDR form
(`10.0.0.0/8`). A host name allows the addresses it resolves to (resolved when first needed,
cached for a minute). Resolving an IP literal is always allowed (it sends nothing); the connect
that follows is checked.

What the hook is handed can lie, so it reads the truth underneath: the socket's family from the
kernel (`getsockopt(SO_DOMAIN)` through the C base class, not a `family` property a subclass may
override), the address's items through `tuple`'s own methods, host and port as the exact `str`/
`bytes`/`int` values the C code used. Only Internet sockets are checked; Unix and netlink sockets
stay on the machine; any other family with a destination (packet, vsock, …) is refused. One gap
is closed outside the hook: `sock.connect(("name", port))` resolves the name in C *before* the
audit event fires, so while a guard is armed `socket.socket`'s `connect`, `connect_ex`,
`sendto` and `sendmsg` first refuse a name that may not be resolved.

Limits, stated plainly: the hook sees sockets opened by Python code in this process (httpx,
asyncio, the standard library). Native code that opens sockets or resolves names itself (a C
library, llama.cpp), a child process, or Python code that calls `_socket` directly with a name
is not covered; the OS is the layer for that (a network namespace, or nftables rules on the
service user's uid: docs/operations.md), and this guard is the in-process proof that codemoat
itself never tries.

`sys.addaudithook` cannot be undone, so the hook is installed once per process and consults the
guard that is armed now; `disarm` makes it inert (tests, server shutdown).
"""

from __future__ import annotations

import _socket
import ipaddress
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

log = logging.getLogger("codemoat.egress")

_INET = (socket.AF_INET, socket.AF_INET6)
#: families whose destinations never leave the machine
_LOCAL = tuple(f for f in (getattr(socket, "AF_UNIX", None), getattr(socket, "AF_NETLINK", None)) if f is not None)
_SO_DOMAIN = getattr(socket, "SO_DOMAIN", None)  # Linux


class EgressBlocked(PermissionError):
    """An outbound destination that is neither loopback nor allow-listed."""


@dataclass(frozen=True)
class Rule:
    host: str | None  # a lower-case name, or None for a network rule
    net: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    port: int | None


def parse_rule(entry: str) -> Rule:
    """`host`, `host:port`, `[v6]:port`, `v6addr`, or `cidr` → a rule."""
    e = entry.strip().lower()
    if "://" in e:  # a URL: its host and (default) port
        from urllib.parse import urlsplit

        u = urlsplit(e)
        port = u.port or {"https": 443, "http": 80}.get(u.scheme)
        host = u.hostname or ""
        e = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    if e.startswith("[") and "]" in e:
        host, _, rest = e[1:].partition("]")
        p = rest[1:] if rest.startswith(":") else None
        if rest and p is None:
            raise ValueError(f"bad egress allow-list entry {entry!r}")
    elif e.count(":") == 1:
        host, p = e.split(":")
    else:
        host, p = e, None
    port = int(p) if p is not None and p.isascii() and p.isdigit() else -1 if p is not None else None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"bad port in egress allow-list entry {entry!r}")
    try:
        return Rule(None, ipaddress.ip_network(host, strict=False), port)
    except ValueError:
        if not host or any(c in host for c in "/ "):
            raise ValueError(f"bad egress allow-list entry {entry!r}") from None
        return Rule(host.rstrip("."), None, port)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """A loopback address, or exactly `localhost` (resolved from /etc/hosts; `*.localhost` is not)."""
    h = host.lower().rstrip(".")
    if h == "localhost":
        return True
    ip = _ip(h)
    if ip is None:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # 0.0.0.0 / :: as a destination means "this host" on Linux
    return ip.is_loopback or ip.is_unspecified


@dataclass
class EgressGuard:
    """Which destinations may be reached; `on_refuse(event, destination)` hears every refusal."""

    allow: Iterable[str] = ()
    loopback: bool = True
    extra: Callable[[], Iterable[str]] | None = None
    on_refuse: Callable[[str, str], None] | None = None
    refused: int = 0
    _resolved: dict[str, tuple[float, set[str]]] = field(default_factory=dict)
    _cache_key: tuple[str, ...] = ()
    _rules: list[Rule] = field(default_factory=list)

    def rules(self) -> list[Rule]:
        entries = tuple(self.allow) + tuple(self.extra() if self.extra else ())
        if entries != self._cache_key:
            rules = []
            for e in entries:
                try:
                    rules.append(parse_rule(e))
                except ValueError as err:
                    log.warning("%s (ignored)", err)
            self._rules, self._cache_key = rules, entries
        return self._rules

    def may_resolve(self, host: str | bytes | None) -> bool:
        if host is None:
            return True
        exact = _exact_host(host)  # what the C code will look up, not what a str subclass says
        if exact is None:
            return False
        h = exact.lower().rstrip(".")
        if h == "" or _ip(h) is not None:  # bind-any, or an IP literal: no query leaves the machine
            return True
        if self.loopback and is_loopback(h):
            return True
        return any(r.host == h for r in self.rules())

    def may_connect(self, host: str, port: int | None) -> bool:
        h = (_exact_host(host) or "").lower().rstrip(".")
        if self.loopback and is_loopback(h):
            return True
        ip = _ip(h)
        for r in self.rules():
            if r.port is not None and r.port != port:
                continue
            if r.net is not None:
                if ip is not None and ip.version == r.net.version and ip in r.net:
                    return True
            elif r.host == h or (ip is not None and str(ip) in self._addresses(r.host)):
                return True
        return False

    def _addresses(self, name: str) -> set[str]:
        hit = self._resolved.get(name)
        if hit and time.monotonic() - hit[0] < 60:
            return hit[1]
        addrs: set[str] = set()
        with _bypass():
            try:
                addrs = {ai[4][0] for ai in socket.getaddrinfo(name, None)}
            except OSError:
                pass
        self._resolved[name] = (time.monotonic(), addrs)
        return addrs

    def refuse(self, event: str, destination: str) -> None:
        self.refused += 1
        log.warning("egress blocked: %s to %s (not loopback or allow-listed)", event, destination)
        if self.on_refuse is not None:
            with _bypass():
                try:
                    self.on_refuse(event, destination)
                except Exception:  # the refusal stands even if recording it fails
                    log.exception("could not record an egress refusal")
        raise EgressBlocked(
            f"outbound connection to {destination} blocked by codemoat's egress guard "
            "(only loopback and policy.egress_allow are reachable)"
        )


_state = threading.local()
_armed: EgressGuard | None = None
_hooked = False
_hook_lock = threading.Lock()


class _bypass:
    """Let the guard's own lookups and recorders through (re-entrancy)."""

    def __enter__(self):
        self.prev = getattr(_state, "busy", False)
        _state.busy = True

    def __exit__(self, *exc):
        _state.busy = self.prev


def _fmt(host, port) -> str:
    host = _exact_host(host) or repr(host)
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _real_family(sock) -> int | None:
    """The socket's family as the kernel knows it (a subclass's `family` property may say otherwise)."""
    if _SO_DOMAIN is not None:
        try:
            return _socket.socket.getsockopt(sock, socket.SOL_SOCKET, _SO_DOMAIN)
        except (OSError, TypeError):
            pass
    try:
        return _socket.socket.family.__get__(sock)
    except TypeError:
        return None


def _exact_host(host) -> str | None:
    """The host as the C code read it: the str's or bytes' own data (never a subclass's methods)."""
    if isinstance(host, str):
        return str.__str__(host)
    if isinstance(host, (bytes, bytearray)):
        return bytes(memoryview(host)).decode("ascii", "replace")
    return None


def _destination(sock, addr) -> tuple[str, int] | str | None:
    """(host, port) of an Internet destination; None for one that stays on the machine; a string
    naming a destination that must be refused unseen (an unknown family, an address that is not a
    plain tuple of host and port)."""
    if addr is None:
        return None  # a send on a connected socket: its connect was checked
    fam = _real_family(sock)
    if fam in _LOCAL:
        return None
    if fam not in _INET:
        return f"family {fam} address {addr!r}"[:200]
    if not isinstance(addr, tuple) or tuple.__len__(addr) < 2:
        return f"address {addr!r}"[:200]
    host, port = _exact_host(tuple.__getitem__(addr, 0)), tuple.__getitem__(addr, 1)
    if host is None or not isinstance(port, int):
        return f"address {addr!r}"[:200]
    return host, int.__index__(port)


def _hook(event: str, args: tuple) -> None:
    if not event.startswith("socket.") or _armed is None or getattr(_state, "busy", False):
        return
    g = _armed
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        dest = _destination(args[0], args[1])
        if isinstance(dest, str):
            g.refuse(event.removeprefix("socket."), dest)
        elif dest is not None and not g.may_connect(*dest):
            g.refuse(event.removeprefix("socket."), _fmt(*dest))
    elif event == "socket.getaddrinfo":
        host, port = args[0], args[1]
        if not g.may_resolve(host):
            g.refuse("getaddrinfo", _fmt(host, port))
    elif event == "socket.gethostbyname":
        if not g.may_resolve(args[0]):
            g.refuse("gethostbyname", _fmt(args[0], None))
    elif event in ("socket.gethostbyaddr", "socket.getnameinfo"):
        target = tuple.__getitem__(args[0], 0) if isinstance(args[0], tuple) else args[0]
        target = _exact_host(target) or ""
        # a reverse lookup of anything but loopback or an allowed address sends a PTR query
        if not (g.loopback and is_loopback(target)) and not g.may_connect(target, None):
            g.refuse(event.removeprefix("socket."), _fmt(target, None))


def _before_resolving(sock, addr, event: str) -> None:
    """Refuse a destination name before the C code resolves it (it does so ahead of the audit event)."""
    g = _armed
    if g is None or getattr(_state, "busy", False):
        return
    dest = _destination(sock, addr)
    if isinstance(dest, tuple) and _ip(dest[0]) is not None:
        return  # an address: the audit event that follows checks it, nothing was resolved
    if isinstance(dest, tuple) and not g.may_resolve(dest[0]):
        g.refuse(event, _fmt(*dest))


def _connect(self, address):
    _before_resolving(self, address, "connect")
    return _socket.socket.connect(self, address)


def _connect_ex(self, address):
    _before_resolving(self, address, "connect")
    return _socket.socket.connect_ex(self, address)


def _sendto(self, data, *flags_address):
    _before_resolving(self, flags_address[-1] if flags_address else None, "sendto")
    return _socket.socket.sendto(self, data, *flags_address)


def _sendmsg(self, buffers, *rest):
    _before_resolving(self, rest[2] if len(rest) > 2 else None, "sendmsg")
    return _socket.socket.sendmsg(self, buffers, *rest)


def arm(guard: EgressGuard) -> EgressGuard:
    """Make `guard` the process's egress policy (installing the audit hook on first use)."""
    global _armed, _hooked
    with _hook_lock:
        if not _hooked:
            sys.addaudithook(_hook)
            socket.socket.connect, socket.socket.connect_ex = _connect, _connect_ex
            socket.socket.sendto, socket.socket.sendmsg = _sendto, _sendmsg
            _hooked = True
        _armed = guard
    return guard


def disarm(guard: EgressGuard | None = None) -> None:
    """Stop enforcing (`guard`, if given, only when it is the one armed)."""
    global _armed
    with _hook_lock:
        if guard is None or _armed is guard:
            _armed = None


def armed() -> EgressGuard | None:
    return _armed
