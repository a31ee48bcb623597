"""The egress guard, tested on loopback only: allow one loopback port, try another.

With `loopback=False` the guard treats 127.0.0.1 like any outside host, so a refused loopback
port stands in for the internet without a single packet leaving the machine.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import httpx
import pytest

from codemoat.audit import egress
from codemoat.audit.egress import EgressBlocked, EgressGuard, parse_rule


@pytest.fixture
def listeners():
    """Two listening loopback ports that accept and close."""
    socks, stop = [], threading.Event()
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        s.settimeout(0.2)
        socks.append(s)

    def serve(s):
        while not stop.is_set():
            try:
                c, _ = s.accept()
                c.close()
            except OSError:
                pass

    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in socks]
    for t in threads:
        t.start()
    yield [s.getsockname()[1] for s in socks]
    stop.set()
    for s in socks:
        s.close()


@pytest.fixture
def strict(listeners):
    """A guard that allows only the first listener, and records refusals."""
    refusals: list[tuple[str, str]] = []
    g = egress.arm(
        EgressGuard(allow=[f"127.0.0.1:{listeners[0]}"], loopback=False, on_refuse=lambda e, d: refusals.append((e, d)))
    )
    yield g, listeners, refusals
    egress.disarm(g)


def connect(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_allowed_port_connects_other_port_blocked(strict):
    g, (ok, blocked), refusals = strict
    connect(ok)
    for _ in range(3):  # a blocked destination stays blocked
        with pytest.raises(EgressBlocked, match=f"127.0.0.1:{blocked}"):
            connect(blocked)
    assert g.refused == 3 and refusals == [("connect", f"127.0.0.1:{blocked}")] * 3
    connect(ok)


def test_every_socket_path_is_guarded(strict):
    g, (ok, blocked), _ = strict
    s = socket.socket()
    with pytest.raises(EgressBlocked):
        s.connect_ex(("127.0.0.1", blocked))
    s.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{blocked}/", timeout=2)

    async def aconnect(port):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()

    with pytest.raises(EgressBlocked):
        asyncio.run(aconnect(blocked))
    asyncio.run(aconnect(ok))
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(EgressBlocked):
        u.sendto(b"x", ("127.0.0.1", blocked))
    u.close()
    with pytest.raises(EgressBlocked):  # a DNS lookup is a way out too; refused before any query
        socket.getaddrinfo("localhost", 80)
    with pytest.raises(EgressBlocked):
        socket.gethostbyname("localhost")
    with pytest.raises(EgressBlocked):
        socket.gethostbyaddr("127.0.0.2")
    assert g.refused >= 6


def test_loopback_allowed_by_default_and_disarm(listeners):
    g = egress.arm(EgressGuard())
    try:
        connect(listeners[1])
        socket.getaddrinfo("localhost", listeners[1])
        socket.getaddrinfo("127.0.0.1", listeners[1])
    finally:
        egress.disarm(g)
    assert g.refused == 0 and egress.armed() is None


def test_allow_list_from_callable_is_read_live(listeners):
    extra: list[str] = []
    g = egress.arm(EgressGuard(loopback=False, extra=lambda: extra))
    try:
        with pytest.raises(EgressBlocked):
            connect(listeners[1])
        extra.append(f"127.0.0.1:{listeners[1]}")  # e.g. the license's key server, filled in later
        connect(listeners[1])
    finally:
        egress.disarm(g)


def test_rules():
    assert parse_rule("KeyServer.example.com:8443") == egress.Rule("keyserver.example.com", None, 8443)
    assert parse_rule("10.0.0.0/8").net is not None and parse_rule("[::1]:80").port == 80
    g = EgressGuard(allow=["10.1.0.0/16", "proxy.corp:3128"], loopback=False)
    assert g.may_connect("10.1.2.3", 443) and not g.may_connect("10.2.0.1", 443)
    assert g.may_connect("proxy.corp", 3128) and not g.may_connect("proxy.corp", 80)
    assert g.may_resolve("proxy.corp") and not g.may_resolve("evil.example") and g.may_resolve("8.8.8.8")
    assert not EgressGuard(loopback=False).may_connect("127.0.0.1", 1)
    assert EgressGuard().may_connect("::ffff:127.0.0.1", 1) and not EgressGuard().may_connect("1.1.1.1", 443)
    assert parse_rule("https://Keys.Vendor.example/v1/lease") == egress.Rule("keys.vendor.example", None, 443)
    assert parse_rule("http://[::1]:8080/x").port == 8080
    with pytest.raises(ValueError):
        parse_rule("host:99999")
    for bad in ("badhost:xx", "host:0", "host:-1", "host:\u0663", "[::1]x", "[::1]:", "a/b"):  # \u0663: an Arabic 3
        with pytest.raises(ValueError, match=r"^bad (port in )?egress allow-list entry"):
            parse_rule(bad)


@pytest.mark.slow
def test_a_mistyped_allow_list_entry_stops_the_server_in_one_line(serve_process, gguf_file):
    """It was warned of in the log and ignored, so the destination it meant stayed unreachable unexplained."""
    srv = serve_process(["--model", str(gguf_file)], env={"CODEMOAT_POLICY__EGRESS_ALLOW": '["proxy.corp:31x28"]'}, wait=False)
    assert srv.proc.wait(timeout=120) == 1
    out = srv.output()
    assert "Traceback" not in out and "policy.egress_allow: bad port in egress allow-list entry 'proxy.corp:31x28'" in out, out


class _ClaimsUnix(socket.socket):
    """A socket that says it is a Unix socket while it is an Internet one."""

    @property
    def family(self):
        return socket.AF_UNIX


def test_socket_subclass_claiming_unix_is_checked_by_its_real_family(strict):
    g, (ok, blocked), refusals = strict
    s = _ClaimsUnix(socket.AF_INET, socket.SOCK_STREAM)
    assert s.family == socket.AF_UNIX  # the lie
    with pytest.raises(EgressBlocked, match=f"127.0.0.1:{blocked}"):
        s.connect(("127.0.0.1", blocked))
    s.close()
    u = _ClaimsUnix(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(EgressBlocked):
        u.sendto(b"x", ("127.0.0.1", blocked))
    u.close()
    with _ClaimsUnix(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(("127.0.0.1", ok))  # the allowed port stays reachable through the subclass
    assert refusals == [("connect", f"127.0.0.1:{blocked}"), ("sendto", f"127.0.0.1:{blocked}")]


def test_address_objects_that_lie_are_read_as_the_c_code_reads_them(strict):
    g, (ok, blocked), _ = strict

    class Addr(tuple):  # indexing says "the allowed port"; the C code reads the tuple's own items
        def __getitem__(self, i):
            return ("127.0.0.1", ok)[i]

    class Port(int):  # compares equal to any allowed port
        def __eq__(self, other):
            return True

        def __ne__(self, other):
            return False

        __hash__ = int.__hash__

    s = socket.socket()
    with pytest.raises(EgressBlocked, match=f"127.0.0.1:{blocked}"):
        s.connect(Addr(("127.0.0.1", blocked)))
    with pytest.raises(EgressBlocked, match=f"127.0.0.1:{blocked}"):
        s.connect(("127.0.0.1", Port(blocked)))
    s.close()


def test_unix_sockets_still_pass(strict, tmp_path):
    path = str(tmp_path / "s")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(path)
    srv.close()
    assert strict[0].refused == 0


def test_localhost_subdomains_are_not_resolved(listeners):
    """`x.localhost` goes to the configured resolver like any name (data can ride in the label)."""
    g = egress.arm(EgressGuard())  # loopback allowed: `localhost` itself resolves from /etc/hosts
    try:
        # Decisions first: on code that resolved these, the test stops here, before any lookup.
        assert not g.may_resolve("secret-data.localhost") and not g.may_connect("secret-data.localhost", listeners[0])
        assert g.may_resolve("localhost") and g.may_connect("localhost", listeners[0])

        class Lies(str):  # a name that calls itself "localhost" to Python code; C looks up its real text
            def __str__(self):
                return "localhost"

            def lower(self):
                return "localhost"

        assert not g.may_resolve(Lies("secret-data.example")) and not g.may_connect(Lies("secret-data.example"), 80)
        with pytest.raises(EgressBlocked):
            socket.getaddrinfo(Lies("secret-data.example"), 80)
        with pytest.raises(EgressBlocked):
            socket.getaddrinfo("secret-data.localhost", 80)
        with pytest.raises(EgressBlocked):
            socket.gethostbyname("secret-data.localhost")
        # connect() with a name resolves it in C before the audit event: refused before that.
        s = socket.socket()
        with pytest.raises(EgressBlocked, match="secret-data.localhost"):
            s.connect(("secret-data.localhost", listeners[0]))
        with pytest.raises(EgressBlocked):
            s.connect_ex(("secret-data.localhost", listeners[0]))
        s.close()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with pytest.raises(EgressBlocked):
            u.sendto(b"x", ("secret-data.localhost", listeners[0]))
        with pytest.raises(EgressBlocked):
            u.sendmsg([b"x"], [], 0, ("secret-data.localhost", listeners[0]))
        u.close()
        with socket.create_connection(("localhost", listeners[0]), timeout=2):
            pass
    finally:
        egress.disarm(g)
    assert g.refused == 7
