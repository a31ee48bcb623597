"""An outside attacker's review of how `codemoat serve` reads a request: clients that never finish one.

Was broken: uvicorn sets no deadline on a request (only on the idle time between two), so a connection
opened and left silent, a head stopped halfway or sent a byte at a time, a body short of its
Content-Length or a chunked body never ended, was held for good; a few hundred of them used every
descriptor a process has under systemd's default limit (1,024), and then no editor got an answer. And a
request's head had no bound: one header line of 300 MiB was read into memory whole. Now (serve.readguard,
server.read_timeout_s) each gets 408 in one line and its connection closes; a head over 64 KiB gets 431.
Beside them, what must still work: a body arriving slowly but steadily, and one keep-alive connection
used for requests over a longer time than the deadline.

Each refusal is awaited up to HANG seconds, many times the deadline set here (2 s): a hang is the
failure, not a slow answer.
"""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest

from rawhttp import HANG, read_until_closed

from conftest import create_token

TIMEOUT = "2"


@pytest.fixture
def server(serve_process, random_gguf):
    s = serve_process(["--model", str(random_gguf), "--model-id", "tiny"], env={"CODEMOAT_SERVER__READ_TIMEOUT_S": TIMEOUT})
    s.token = create_token("--name", "dev")
    return s


_answer = read_until_closed  # everything until the server closes (the test fails after HANG s)


def _request(token: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
        % token.encode()
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


def _status(data: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    return int(m.group(1)) if m else None


def test_requests_that_never_finish_get_408_and_their_connections_close(server):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n" % server.token.encode()
    cases = {
        "silent": b"",
        "half a head": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",
        "a body short of its length": head + b'Content-Length: 1000\r\n\r\n{"prompt": ',
        "a chunked body never ended": head + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"pro\r\n',
    }
    conns = {}
    for what, sent in cases.items():
        conns[what] = socket.create_connection(("127.0.0.1", server.port), timeout=HANG)
        conns[what].sendall(sent)
    trickle = socket.create_connection(("127.0.0.1", server.port), timeout=HANG)
    start, got = time.monotonic(), b""
    try:  # a byte of a head now and then: each byte does not earn the connection another deadline
        for b in b"POST /v1/completions HTTP/1.1\r\nX-Slow: " + b"a" * 1000:
            trickle.sendall(bytes([b]))
            time.sleep(0.25)
            if time.monotonic() - start > HANG:
                pytest.fail(f"a head sent a byte every 0.25 s was still read after {HANG} s")
    except (BrokenPipeError, ConnectionResetError):
        pass
    got = _answer(trickle)
    assert _status(got) == 408, got[:300]
    for what, s in conns.items():
        data = _answer(s)
        assert _status(data) == 408, (what, data[:300])
        text = data.split(b"\r\n\r\n", 1)[1]
        assert b"\n" not in text and b"request not received in time" in text, (what, text)
        s.close()
    trickle.close()
    assert "Traceback" not in server.output(), server.output()[-3000:]


def test_a_head_over_64_kib_is_431_before_it_is_read_whole(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Huge: ")
        try:
            for _ in range(64):  # 64 MiB offered; the server stops reading after the first 64 KiB or so
                s.sendall(b"a" * (1 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = _answer(s)
    assert _status(data) == 431 and b"request head is larger than 65,536 bytes" in data, data[:300]
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:  # a large ordinary head is read
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 30_000 + b"\r\nConnection: close\r\n\r\n")
        assert _status(_answer(s)) == 200


def test_a_slow_steady_body_and_a_long_lived_keep_alive_connection_are_served(server):
    """The negatives: a body taking twice the deadline at 2 KiB a second is answered (each KiB earns a
    second), and one connection carries requests for longer than the deadline (it is per request)."""
    prompt = json.dumps({"model": "tiny", "prompt": "def f(", "max_tokens": 1, "user": "x" * 8000}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        whole = _request(server.token, prompt, b"Connection: close\r\n")
        for i in range(0, len(whole), 1024):
            s.sendall(whole[i : i + 1024])
            time.sleep(0.5)
        data = _answer(s)
    assert _status(data) == 200, data[:300]
    small = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 1}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        for _ in range(3):
            s.sendall(_request(server.token, small))
            data = b""
            while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
                data += s.recv(65536)
            assert _status(data) == 200, data[:300]
            time.sleep(1.5)  # under uvicorn's keep-alive (5 s); three of them outlast the 2 s deadline


def _length(data: bytes) -> int:
    m = re.search(rb"(?i)content-length: (\d+)", data)
    return int(m.group(1)) if m else 0


def test_a_client_pipelining_without_reading_is_cut_off_and_a_few_pipelined_requests_are_answered(server):
    """Was: uvicorn queued every request read while another was answered and read on whenever the app waited on
    `receive()` (the hang-up watch), so one connection sending `GET /livez` without reading the answers grew the
    server by 1.3 GB in 20 s. Now more than 32 waiting close the connection: the sender is cut off long before
    300,000 requests (10 MB). The negative: 30 pipelined requests are all answered, in order."""
    import threading

    one = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"
    outcome: list = []

    def flood(s: socket.socket) -> None:
        try:
            for _ in range(30):
                s.sendall(one * 10_000)
            outcome.append("all sent")
        except OSError as e:
            outcome.append(e)

    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        t = threading.Thread(target=flood, args=(s,), daemon=True)
        t.start()
        t.join(HANG)
        assert outcome and isinstance(outcome[0], OSError), outcome or f"still sending after {HANG} s"
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(one * 29 + b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = _answer(s)
    assert data.count(b"HTTP/1.1 200 ") == 30, data[-300:]


def _tcp_state(s: socket.socket) -> int:
    """The kernel's TCP state of `s` (TCP_INFO's first byte): 1 established, 7 closed (the peer reset it)."""
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def test_a_client_that_never_reads_its_answers_is_let_go(server):
    """Was: the deadline waits while the server answers, and an answer waits for the client to read it, so a client
    sending requests one at a time (never 32 waiting) and reading nothing, its window shut, held the connection
    for good: the answers stuck in the server's buffers, the request's task stuck in `drain()`, and a `close()` of
    the connection (the keep-alive timer, the pipelining bound) waiting for those buffers to empty, which they never
    do. Now the connection is reset once the client has taken none of its answers for read_timeout_s."""
    one = b"GET /admin/static/console.css HTTP/1.1\r\nHost: x\r\n\r\n"  # 3 KiB answered without a token
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a shut window soon: the server's answers back up
    s.connect(("127.0.0.1", server.port))
    s.settimeout(1)
    sent = 0
    try:
        while sent < 2_000:  # 6 MiB of answers, past what the kernel buffers between the two
            s.sendall(one)
            sent += 1
            time.sleep(0.004)  # one at a time, answered before the next: none waiting
    except (TimeoutError, OSError):
        pass  # the server stopped reading: its answers have nowhere to go
    start = time.monotonic()
    while _tcp_state(s) == 1:
        if time.monotonic() - start > HANG:
            pytest.fail(f"the connection was still held {HANG} s after the client stopped reading ({sent} requests sent)")
        time.sleep(0.5)
    s.close()


def test_a_client_reading_its_answers_slowly_is_served_to_the_end(server):
    """The negative: a client whose window is shut most of the time, but which takes a KiB every 5 ms (its answers
    come four times faster than it reads them, for longer than the deadline), gets every answer."""
    import threading

    one = b"GET /admin/static/console.css HTTP/1.1\r\nHost: x\r\n\r\n"
    count, got = 300, bytearray()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", server.port))
    s.settimeout(HANG)

    def read() -> None:
        try:
            while got.count(b"HTTP/1.1 200 ") < count and (chunk := s.recv(1024)):
                got.extend(chunk)
                time.sleep(0.005)
        except OSError as e:
            got.extend(f"\n{e!r}".encode())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    for _ in range(count - 1):
        s.sendall(one)
        time.sleep(0.004)
    s.sendall(one.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    reader.join(HANG)
    s.close()
    assert got.count(b"HTTP/1.1 200 ") == count, (got.count(b"HTTP/1.1 200 "), bytes(got[-200:]))


def test_a_body_sent_fast_then_stopped_does_not_bank_its_seconds(server):
    """Was: each KiB received earned a second whenever it came, so 200 KB sent at once and then nothing bought a
    stall of 200 s (8 MiB, server.max_body_mb: 2.3 hours) on a connection, its body held by the app the while.
    Now a KiB earns a second only up to read_timeout_s ahead: a stall of more than that is cut whatever came
    before. The negative, a body arriving steadily for twice the deadline, is served (the test above)."""
    body = b'{"prompt": "' + b"a" * 199_000
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(_request(server.token, b"")[: -len(b"Content-Length: 0\r\n\r\n")] + b"Content-Length: 200000\r\n\r\n" + body)
        data = _answer(s)  # held 195 s before: past HANG
    assert _status(data) == 408, data[:300]


def test_upgrade_requests_add_no_line_to_the_log(server):
    """uvicorn logged 'WARNING: Unsupported upgrade request.' for every request asking for h2c (curl --http2 over
    http://), so anyone without a token could fill the log a line per request (found by helper V). Each is still
    answered as HTTP/1.1, 401 without a token, 200 with one; the log gains no such line."""
    h2c = {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"}
    for _ in range(20):
        assert httpx.get(server.url + "/v1/models", headers=h2c).status_code == 401
    ok = httpx.get(server.url + "/v1/models", headers={**h2c, "Authorization": f"Bearer {server.token}"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "tiny"
    assert "Unsupported upgrade" not in server.output()


def test_a_client_that_pipelines_requests_and_hangs_up_after_the_first_answer_leaves_no_traceback(server):
    """Was (an outside fuzzer): three requests pipelined on one connection, the first answer read, then a hang-up.
    uvicorn marks only the newest request it parsed as disconnected, so the one being answered wrote to the
    closed transport: uvloop raised, and the log got two tracebacks ("internal error", "Exception in ASGI
    application") per connection, from anyone, no token needed. Now every request on the connection reads the
    hang-up. The negative: the same three pipelined and all read are all answered."""
    for path, auth in (("/v1/models", b""), ("/v1/models", b"Authorization: Bearer %s\r\n" % server.token.encode())):
        one = b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path.encode(), auth)
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
                s.sendall(one * 3)
                s.recv(65536)
        with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
            s.sendall(one * 2 + one.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"))
            data = _answer(s)
        assert data.count(b"HTTP/1.1 ") == 3, data[-300:]
    time.sleep(0.5)  # what the server logs about the last connections
    log = server.output()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def test_an_upgrade_request_with_a_body_is_served_not_answered_as_if_empty(server):
    """Was (an outside fuzzer): `curl --http2 -d '{...}'` over http:// (Upgrade: h2c with a body) was answered
    "request body is empty": llhttp takes the bytes after an upgrade's head for the new protocol, so the body never
    reached the route. It was then refused with a 400; now the upgrade is ignored, as RFC 9113 lets a server do, and
    the request is served as HTTP/1.1 (tests/serve/test_http_layer.py has the cut-short and chunked cases). The
    negative: the same request without Upgrade is served alike."""
    body = json.dumps({"model": "tiny", "prompt": "def f", "max_tokens": 2}).encode()
    h2c = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    for extra in (h2c, b"Connection: close\r\n"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
            s.sendall(_request(server.token, body, extra))
            data = _answer(s)
        assert _status(data) == 200 and b'"text_completion"' in data and b"empty" not in data, data[:300]
    time.sleep(0.3)
    assert "Traceback" not in server.output(), server.output()[-3000:]


def test_malformed_requests_are_answered_400_and_add_no_line_to_the_log(server):
    """Was (an outside fuzzer): uvicorn logged 'WARNING: Invalid HTTP request received.' for every request it
    could not parse: anyone, without a token, could add a line to the log per connection. Each still gets its 400."""
    for bad in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad\x00Header: 1\r\n\r\n", b"GET /\x7f HTTP/1.1\r\n\r\n"):
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
                s.sendall(bad)
                assert _status(_answer(s)) == 400
    assert httpx.get(server.url + "/livez").status_code == 200
    assert "Invalid HTTP request" not in server.output(), server.output()[-2000:]
