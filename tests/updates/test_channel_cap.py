"""The vendor's channel serves a bounded number of connections at once (updates.channel._Capped): before,
each connection started a thread, so a flood of idle ones (each held up to the timeout) grew the process's
threads without limit until it could not serve or start any. Past the cap, in all or from one address, a
new connection is answered 503 and closed at once; a freed slot serves again. Real sockets on 127.0.0.x."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request

import pytest

from codemoat.updates.channel import make_server

WAIT = 60  # a client's socket timeout: a connection the server neither answers nor closes fails the test


@pytest.fixture
def capped(tmp_path):
    pub = tmp_path / "published"
    pub.mkdir()
    (pub / "a.moatpkg").write_bytes(b"x" * 10)
    # a connection left idle is kept up to 30 s: longer than the test needs, shorter than WAIT
    srv = make_server(pub, "127.0.0.1", 0, timeout_s=30, max_connections=4, max_per_address=2)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _idle(srv, source: str) -> socket.socket:
    """A connection from `source` (a loopback address) that sends nothing."""
    s = socket.create_connection(srv.server_address, timeout=WAIT, source_address=(source, 0))
    return s


def _first_answer(s: socket.socket) -> bytes:
    """What the server says to a connection that sent nothing, up to its closing (b"" if it said nothing)."""
    got = b""
    while chunk := s.recv(4096):
        got += chunk
    return got


def _index_status(srv, source: str) -> int:
    s = _idle(srv, source)
    with s:
        s.sendall(b"GET /index.json HTTP/1.1\r\nHost: channel\r\nConnection: close\r\n\r\n")
        head = _first_answer(s)
    return int(head.split(b" ", 2)[1]) if head else 0


def _until_served(srv, source: str) -> int:
    """GET /index.json from `source` until it is not refused (a slot frees once the server's thread sees the close)."""
    for _ in range(500):
        status = _index_status(srv, source)
        if status != 503:
            return status
        threading.Event().wait(0.02)
    return 503


def test_connections_past_the_cap_are_refused_at_once_and_served_again_once_one_ends(capped):
    url = f"http://127.0.0.1:{capped.server_address[1]}"
    with urllib.request.urlopen(url + "/index.json", timeout=WAIT) as r:  # the positive: served
        assert [e["file"] for e in json.load(r)] == ["a.moatpkg"]

    a = [_idle(capped, "127.0.0.1"), _idle(capped, "127.0.0.1")]  # one address's share
    assert _first_answer(_idle(capped, "127.0.0.1")).startswith(b"HTTP/1.1 503")  # a third from it: refused
    assert _index_status(capped, "127.0.0.2") == 200  # another address is served meanwhile

    b = [_idle(capped, "127.0.0.2"), _idle(capped, "127.0.0.3")]  # 4 held: the cap in all
    refused = _idle(capped, "127.0.0.4")
    assert _first_answer(refused).startswith(b"HTTP/1.1 503")
    assert _index_status(capped, "127.0.0.5") == 503
    threads = threading.active_count()
    for _ in range(50):  # a flood past the cap starts no thread
        _idle(capped, "127.0.0.6").close()
    assert threading.active_count() <= threads

    for s in a + b:
        s.close()
    assert _until_served(capped, "127.0.0.1") == 200  # the slots come back
    assert _until_served(capped, "127.0.0.5") == 200


def test_one_address_is_an_ipv6_64_and_an_ipv4_address():
    """One host is given a whole IPv6 /64: counting its addresses one by one let it hold every slot. An IPv4-mapped
    address counts as its IPv4 address; distinct /64s and distinct IPv4 addresses are distinct sources."""
    from codemoat.updates.channel import source_of

    assert source_of("2001:db8:1:2::1") == source_of("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("::ffff:192.0.2.7") == source_of("192.0.2.7") == "192.0.2.7"
    assert source_of("192.0.2.7") != source_of("192.0.2.8")
    assert source_of("fe80::1%eth0") == "fe80::/64"


def test_a_fetch_from_a_busy_channel_says_it_is_busy(tmp_path, home):
    """A customer's `update fetch` against a channel at its cap said only "update channel answered 503"."""
    from conftest import run_cli

    pub = tmp_path / "published"
    pub.mkdir()
    srv = make_server(pub, "127.0.0.1", 0, timeout_s=30, max_connections=1, max_per_address=1)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    hold = _idle(srv, "127.0.0.1")
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        r = run_cli("update", "fetch", "--channel", url)
        assert r.returncode == 1 and "update channel is busy" in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        hold.close()
        srv.shutdown()
        srv.server_close()
