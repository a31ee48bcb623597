"""The optional online channel (off by default): the vendor publishes bundles over HTTP, the customer polls.

Vendor: `codemoat vendor channel --dir DIR` serves DIR's `*.moatpkg` files and `GET /index.json`
(name, size, SHA-256 of each). Bundles are signed and their payloads sealed, so the channel needs
no secret of its own; whatever arrives is checked by `update verify/apply` like a file off a USB
stick. Customer: `codemoat update fetch` (URL from `update.channel_url` or `--channel`) downloads
new bundles into `$CODEMOAT_HOME/updates/inbox/`; the process's egress guard allows exactly the
channel's host and port, and every request is recorded in the outbound log before it is sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from .. import paths
from ..deadline import ANSWER_TIMEOUTS, DeadlinePassed, within
from ..errors import CodemoatError

T = TypeVar("T")
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}\.moatpkg")
MAX_BUNDLE = 64 << 30
MAX_INDEX = 16 << 20  # bytes of index.json read at most (an entry is about 120 bytes: some 100,000 bundles)
#: JSON values the index may hold, counted before it is decoded (commas plus opening brackets, as `trace.st_io`):
#: an entry holds 4 (its object, two commas inside, one before it), so ~250,000 bundles fit; 16 MiB of `{},`
#: decoded into 5.6 million objects peaked at 445 MB before the first was found malformed
MAX_INDEX_VALUES = 1_000_000
KEEP_FREE = 1 << 30  # bytes a fetch leaves free on the inbox's file system (the database and audit log live there too)
TIMEOUT_S = 60.0  # each connect, read and write (httpx's timeout, which never bounds a whole answer)
#: connections the vendor's channel serves at once (a thread each), and from one address: past either, a new
#: one is answered 503 and closed at once. A customer's fetch holds one; a flood of idle ones (each held up to
#: TIMEOUT_S) started a thread apiece until the process ran out of threads or memory. "One address" is an IPv6
#: /64 (one host is given a whole /64, so counting its addresses one by one capped nothing); a customer's machines
#: behind one egress proxy or NAT share one, so the cap per address leaves room for a fleet fetching at once
MAX_CONNECTIONS = 64
MAX_PER_ADDRESS = 16
MIN_RATE = 64 << 10  # bytes/s: a bundle's download may take ANSWER_TIMEOUTS x TIMEOUT_S plus its size at this rate


def index(folder: Path, known: dict[tuple, str] | None = None, seen: dict[tuple, str] | None = None) -> list[dict[str, Any]]:
    """Name, size and SHA-256 of each bundle in `folder`. A bundle whose name, device, inode, size,
    modification and change times are a key of `known` is not read again; `seen` gets every bundle's key and digest."""
    out = []
    for p in sorted(folder.glob("*.moatpkg")):
        if not _FILE.fullmatch(p.name) or not p.is_file():
            continue
        st = p.stat()
        # ctime too: a file rewritten in place at its size with its mtime put back (cp -p, touch -d) keeps the
        # other four, but every write and every utime() moves ctime, which nobody can set
        key = (p.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        digest = (known or {}).get(key)
        if digest is None:
            digest = _sha256_of(p)
        if seen is not None:
            seen[key] = digest
        out.append({"file": p.name, "size": st.st_size, "sha256": digest})
    return out


def make_server(
    folder: Path,
    host: str,
    port: int,
    timeout_s: float = TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    max_per_address: int = MAX_PER_ADDRESS,
) -> ThreadingHTTPServer:
    """The vendor's channel: GET /index.json and GET /<name>.moatpkg from `folder`, nothing else.

    Anyone who can reach it may ask, so an answer costs no more than it must: each bundle is hashed once
    (again only when its file changes; before, every GET /index.json read every bundle whole: 0.9 s a
    GiB, eight at once 8 s of the server's CPU), and one connection is read or written at most
    `timeout_s` without progress before it is closed (before, a connection left silent held its thread
    for good), and a request's head is due whole within `timeout_s` (a byte now and then does not hold it).
    At most `max_connections` are served at once, `max_per_address` from one address (`_Capped`)."""
    folder = Path(folder).resolve()
    digests: dict[tuple, str] = {}
    hashing = threading.Lock()  # the first index after a release is built once, not by every caller at once

    class Handler(BaseHTTPRequestHandler):
        timeout = timeout_s  # socketserver.StreamRequestHandler: the socket's timeout, per recv and send

        def setup(self) -> None:
            super().setup()
            # the head whole within timeout_s: the socket's timeout is per recv, which a byte now and then resets
            self._late = False
            self._head_due = threading.Timer(timeout_s, self._head_late)
            self._head_due.daemon = True
            self._head_due.start()

        def _head_late(self) -> None:
            self._late = True
            try:
                self.connection.shutdown(socket.SHUT_RD)  # its read ends (a line cut short: 400), then it closes
            except OSError:
                pass

        def parse_request(self) -> bool:  # the request line read, then its headers
            try:
                ok = super().parse_request()
            finally:
                self._head_due.cancel()
            if self._late:  # headers cut short read as if whole: not answered
                self.close_connection = True
                return False
            return ok

        def finish(self) -> None:
            self._head_due.cancel()
            super().finish()

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def do_GET(self) -> None:  # noqa: N802
            name = self.path.lstrip("/")
            if name == "index.json":
                with hashing:
                    seen: dict[tuple, str] = {}
                    entries = index(folder, digests, seen)
                    digests.clear()  # what is published now, no more: removed or replaced bundles go
                    digests.update(seen)
                body = json.dumps(entries).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            p = folder / name
            if not _FILE.fullmatch(name) or not p.is_file():
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(p.stat().st_size))
            self.end_headers()
            with open(p, "rb") as f:
                while b := f.read(1 << 20):
                    self.wfile.write(b)

    server = _IPv6Server if ":" in host else _Capped  # ThreadingHTTPServer alone binds IPv4 only
    srv = server((host, port), Handler)
    srv.cap(max_connections, max_per_address)
    return srv


_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _Capped(ThreadingHTTPServer):
    """A thread per connection, up to a cap in all and per address: one past it is answered 503 and closed
    by the accepting thread, which never waits on it (its send buffer is empty: the short answer fits)."""

    def cap(self, total: int, per_address: int) -> None:
        self._total, self._per_address = total, per_address
        self._held: dict[str, int] = {}
        self._counting = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        addr = source_of(client_address[0])
        with self._counting:
            full = sum(self._held.values()) >= self._total or self._held.get(addr, 0) >= self._per_address
            if not full:
                self._held[addr] = self._held.get(addr, 0) + 1
        if full:
            try:
                request.setblocking(False)
                request.send(_BUSY)
                request.recv(1 << 16)  # what it sent already, read: closed unread, its 503 could be lost to a reset
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts its thread (process_request_thread)
        except BaseException:
            self._release(addr)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(source_of(client_address[0]))

    def _release(self, addr: str) -> None:
        with self._counting:
            left = self._held.get(addr, 0) - 1
            if left > 0:
                self._held[addr] = left
            else:
                self._held.pop(addr, None)


def source_of(address: str) -> str:
    """What the cap per address counts a peer as: an IPv4 address (an IPv4-mapped IPv6 one too), or an IPv6 /64."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class _IPv6Server(_Capped):
    address_family = socket.AF_INET6


def guard_for(url: str):
    """An egress guard that allows exactly the channel's host and port (and loopback, as the server's does)."""
    from ..audit.egress import EgressGuard
    from ..config.serving import netloc

    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise CodemoatError(f"update channel URL {_without_userinfo(url)!r} must be http(s)://HOST[:PORT]/PATH")
    return EgressGuard(allow=[netloc(u.hostname, u.port or (443 if u.scheme == "https" else 80))])


def _without_userinfo(url: str) -> str:
    """`url` without the user and password a channel behind basic auth has in it (httpx still sends them)."""
    u = urlsplit(url)
    if "@" not in u.netloc:
        return url
    return urlunsplit(u._replace(netloc=u.netloc.rsplit("@", 1)[1]))


def _bounded(limit: float, fn: Callable[[], T], base: str, stop: threading.Event | None = None) -> T:
    """fn() (an exchange with the channel), or one line once `limit` seconds pass without its whole answer."""
    try:
        return within(limit, fn, base, stop)
    except DeadlinePassed:
        raise CodemoatError(f"update channel {base} is unreachable: no complete answer in {limit:g} s") from None


def _sha256_of(path: Path) -> str:
    """The file's sha256, read 8 MiB at a time (a published bundle on the channel, the inbox's copy on fetch)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(8 << 20):
            h.update(b)
    return h.hexdigest()


def _holds(dest: Path, size: int, digest: str) -> bool:
    """Whether the inbox's `dest` is already this bundle: a file of its size and digest. The size alone said so
    for a bundle re-released under the same name at the same size, which was then never fetched."""
    try:
        if not dest.is_file() or dest.stat().st_size != size:
            return False
        return _sha256_of(dest) == digest
    except OSError:
        return False


def _read_index(c: Any, base: str, stop: threading.Event) -> tuple[int, bytes | None]:
    """(status, body) of GET /index.json; body None past `MAX_INDEX` bytes (read no further: httpx's .get() read an
    endless answer into memory, and on after the deadline, in the thread it abandoned)."""
    with c.stream("GET", f"{base}/index.json") as resp:
        if resp.status_code != 200:
            return resp.status_code, b""
        body = bytearray()
        for b in resp.iter_bytes():
            if stop.is_set():
                break
            body += b
            if len(body) > MAX_INDEX:
                return 200, None
        return 200, bytes(body)


def _room_for(inbox: Path, new: dict[str, tuple[int, str]]) -> None:
    """Refuse (one line, before any download) bundles whose sizes, as the index gives them, would leave under
    `KEEP_FREE` bytes free where the inbox is: an index (the channel is not trusted, nor is a plain-http path to it)
    could name new bundles until the disk that holds the database and the audit log was full."""
    need = sum(size for size, _ in new.values())
    if not need:
        return
    free = shutil.disk_usage(inbox).free
    if need > free - KEEP_FREE:
        gib = 1 << 30
        raise CodemoatError(
            f"the update channel's {len(new)} new bundle(s) come to {need / gib:,.1f} GiB; {inbox} has "
            f"{free / gib:,.1f} GiB free and a fetch leaves {KEEP_FREE / gib:g} GiB of it: nothing was downloaded"
        )


def fetch(url: str, inbox: Path) -> list[dict[str, Any]]:
    """Download the channel's bundles not yet in `inbox` (by name and digest) into it; returns what was fetched."""
    import httpx

    from ..audit.egress import arm, disarm
    from ..vault.lease import record_outbound

    base = url.rstrip("/")
    shown = _without_userinfo(base)  # what the outbound log and messages name: a password in the URL is not logged
    guard = arm(guard_for(url))
    inbox.mkdir(parents=True, exist_ok=True)
    got = []
    try:
        with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False) as c:
            rid = uuid.uuid4().hex[:16]
            record_outbound(f"{shown}/index.json", "GET", None, None, rid)
            stop = threading.Event()
            status, body = _bounded(TIMEOUT_S * ANSWER_TIMEOUTS, lambda: _read_index(c, base, stop), shown, stop)
            record_outbound(f"{shown}/index.json", "GET", None, status, rid)
            if status == 503:
                raise CodemoatError(
                    "update channel is busy (503: it serves a bounded number of downloads at once): try again in a minute"
                )
            if status != 200:
                raise CodemoatError(f"update channel answered {status} for its index")
            if body is None:
                raise CodemoatError(f"update channel index is larger than {MAX_INDEX >> 20} MiB: not read further")
            if body.count(b",") + body.count(b"{") + body.count(b"[") > MAX_INDEX_VALUES:
                raise CodemoatError(f"update channel index holds more than {MAX_INDEX_VALUES:,} JSON values: not decoded")
            try:
                entries = json.loads(body)
            except (ValueError, RecursionError):  # RecursionError: nested past the decoder's limit
                entries = None
            if not isinstance(entries, list):
                raise CodemoatError("update channel index is not a JSON list")
            new: dict[str, tuple[int, str]] = {}
            seen: set[str] = set()
            for e in entries:
                name, size, digest = (e.get("file"), e.get("size"), e.get("sha256")) if isinstance(e, dict) else (None,) * 3
                if not (
                    isinstance(name, str)
                    and _FILE.fullmatch(name)
                    and isinstance(size, int)
                    and 0 < size <= MAX_BUNDLE
                    and isinstance(digest, str)
                ):
                    raise CodemoatError("update channel index holds a malformed entry")
                if name in seen:  # the first entry of a name counts: an inbox bundle is hashed once, however often it is named
                    continue
                seen.add(name)
                if not _holds(inbox / name, size, digest):
                    new[name] = (size, digest)
            _room_for(inbox, new)
            for name, (size, digest) in new.items():
                dest = inbox / name
                rid = uuid.uuid4().hex[:16]
                record_outbound(f"{shown}/{name}", "GET", None, None, rid)
                tmp = inbox / f".{name}.partial"
                h, n, stop = hashlib.sha256(), 0, threading.Event()
                own = paths.open_own(tmp, "download", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # no link, no FIFO

                def download() -> int:
                    got = 0
                    with os.fdopen(own, "wb") as f, c.stream("GET", f"{base}/{name}") as resp:
                        record_outbound(f"{shown}/{name}", "GET", None, resp.status_code, rid)
                        if resp.status_code != 200:
                            raise CodemoatError(f"update channel answered {resp.status_code} for {name}")
                        for b in resp.iter_bytes():
                            got += len(b)
                            if got > size or stop.is_set():  # too long, or given up on: nothing more is written
                                break
                            h.update(b)
                            f.write(b)
                    return got

                try:
                    n = _bounded(TIMEOUT_S * ANSWER_TIMEOUTS + size / MIN_RATE, download, shown, stop)
                except BaseException:  # any failure (an answer cut short: httpx's error), not only a refusal or a timeout:
                    stop.set()  # a partial download left behind was one more each fetch, as large as the index said
                    tmp.unlink(missing_ok=True)
                    raise
                if n != size or h.hexdigest() != digest:
                    tmp.unlink(missing_ok=True)
                    raise CodemoatError(f"{name} from the update channel does not match its index entry")
                tmp.replace(dest)
                got.append({"file": str(dest), "size": size})
    except httpx.HTTPError as e:
        raise CodemoatError(f"update channel {shown} is unreachable: {type(e).__name__}") from None
    finally:
        disarm(guard)
    return got
