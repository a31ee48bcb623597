"""The HTTP layer under editors, proxies and odd clients, through a real `codemoat serve` on 127.0.0.1 read by raw
sockets: what it answers before any route sees a request, what it does with a client that half-closes, and what
the audit log says of an answer whose client left.

Each wait is bounded by rawhttp.HANG, many times the read deadline set here (2 s): a hang is the failure.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time

import pytest

from conftest import ServerProcess, create_token, run_cli
from rawhttp import HANG, read_until_closed


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A random-weight model that greedily never stops (6000 tokens take seconds), requests due within 2 s."""
    from tinymodel import build_tiny_gguf

    model = build_tiny_gguf(tmp_path_factory.mktemp("slow") / "slow.gguf", n_layer=4, n_embd=256, n_ctx=8192, seed=2)
    home = tmp_path_factory.mktemp("home")
    env = {"CODEMOAT_HOME": str(home), "CODEMOAT_MODEL__MAX_TOKENS_LIMIT": "8000", "CODEMOAT_MODEL__N_CTX": "8192"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**env, "CODEMOAT_SERVER__READ_TIMEOUT_S": "2"}.items():
            mp.setenv(k, v)
        token = create_token("--name", "dev")
        s = ServerProcess(["--model", str(model), "--model-id", "m"])
    s.token, s.home = token, home
    yield s
    s.stop()


def _send(server, data: bytes, then: str = "read") -> bytes:
    """`data` on a new connection, then: read until the server closes; or half-close first ("shut")."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(data)
        if then == "shut":
            s.shutdown(socket.SHUT_WR)
        return read_until_closed(s)


def _answers(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Each sized answer in `data`: (status, headers, body)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower().decode(): v.strip().decode() for k, _, v in (x.partition(b":") for x in lines[1:])}
        n = int(headers.get("content-length", len(rest)))
        out.append((status, headers, rest[:n]))
        data = rest[n:]
    return out


def _one(data: bytes) -> tuple[int, dict, object]:
    [(status, headers, body)] = _answers(data)
    assert headers["content-type"] == "application/json" and headers.get("connection") == "close", headers
    return status, headers, json.loads(body)


def _get(path: str, token: str | None = None, extra: bytes = b"") -> bytes:
    auth = b"Authorization: Bearer %s\r\n" % token.encode() if token else b""
    return b"GET %s HTTP/1.1\r\nHost: x\r\n%s%s\r\n" % (path.encode(), auth, extra)


def _post(path: str, token: str, doc: dict) -> bytes:
    body = json.dumps(doc).encode()
    return (
        b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % (path.encode(), token.encode(), len(body))
        + body
    )


def _records(server) -> list[dict]:
    out = run_cli("audit", "export", "--kind", "request", env={"CODEMOAT_HOME": str(server.home)})
    assert out.returncode == 0, out.stderr
    return [json.loads(x) for x in out.stdout.splitlines()]


def _records_after(server, before: int, want: int) -> list[dict]:
    """The records written after the first `before`, once there are `want` of them (the test fails after HANG s)."""
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        recs = _records(server)[before:]
        if len(recs) >= want:
            return recs
        time.sleep(0.1)
    pytest.fail(f"fewer than {want} new audit records after {HANG} s: {recs}")


def _openai_error(doc) -> dict:
    assert isinstance(doc, dict) and set(doc) == {"error"} and isinstance(doc["error"], dict), doc
    assert {"message", "type", "code", "param"} <= set(doc["error"]), doc
    return doc["error"]


def _big_head(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\nX-Huge: " % path.encode() + b"a" * (70 << 10)  # never ended


def _too_large(server, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        try:
            s.sendall(_big_head(path))
            for _ in range(16):
                s.sendall(b"a" * (64 << 10))
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_until_closed(s)


def test_the_http_layers_own_refusals_are_json_in_the_shape_of_the_requests_protocol(server):
    """Was: a request llhttp cannot parse got uvicorn's text/plain 400 "Invalid HTTP request received.", and the read
    guard's 431 and 408 (and the 400 for an h2c upgrade with a body) were text/plain too, where editors' plugins parse
    every error as JSON. Now each is JSON with Connection: close, in the shape of its path's protocol where the path
    was read (OpenAI, Ollama, llama.cpp's /infill), OpenAI's where none was."""
    status, _, doc = _one(_send(server, b"GARBAGE\r\n\r\n"))
    assert status == 400 and "cannot be parsed" in _openai_error(doc)["message"]
    status, _, doc = _one(_send(server, b"GET / HTTP/1.1\r\nHost: x\r\nBad\x00Header: 1\r\n\r\n"))
    assert status == 400 and doc == {"error": doc["error"]} and "cannot be parsed" in str(doc)

    status, _, doc = _one(_too_large(server, "/api/tags"))
    assert status == 431 and isinstance(doc["error"], str) and "larger than 65,536 bytes" in doc["error"], doc  # Ollama's
    status, _, doc = _one(_too_large(server, "/v1/chat/completions?x=1"))
    assert status == 431 and _openai_error(doc)["type"] == "invalid_request_error"
    status, _, doc = _one(_too_large(server, "/infill"))
    assert status == 431 and doc["error"]["code"] == 431 and "larger than" in doc["error"]["message"], doc  # llama.cpp's

    status, _, doc = _one(_send(server, b""))  # silent: nothing of a request was read
    assert status == 408 and "not received in time" in _openai_error(doc)["message"]
    cut = _post("/api/generate", server.token, {"model": "m", "prompt": "x" * 99})[:-50]
    status, _, doc = _one(_send(server, cut))
    assert status == 408 and isinstance(doc["error"], str), doc  # a body cut short: its route's (Ollama's)

    chunked = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n%sTransfer-Encoding: chunked\r\n\r\n"
    status, _, doc = _one(_send(server, chunked % (server.token.encode(), H2C) + b"2\r\n{}\r\n0\r\n\r\n"))
    assert status == 400 and "Upgrade: h2c" in _openai_error(doc)["message"]


H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"


def test_an_h2c_upgrade_request_with_a_body_is_served_as_http_1_1(server):
    """Was (an outside fuzzer, then a refusal): `curl --http2 -d '{...}'` over http:// (Upgrade: h2c with a body) was
    answered "request body is empty", llhttp taking the body for the new protocol; then it was refused with a 400.
    Now the upgrade is ignored, as RFC 9113 allows, and the request served as HTTP/1.1 with its body, whether the body
    comes with the head or after it, and the connection then closes. A chunked one is still refused (above)."""
    doc = {"model": "m", "prompt": "def f", "max_tokens": 2}
    whole = _post("/v1/completions", server.token, doc).replace(b"Host: x\r\n", b"Host: x\r\n" + H2C)
    [(status, _, body)] = _answers(_send(server, whole))  # the server closes after it: read_until_closed returns
    assert status == 200 and json.loads(body)["object"] == "text_completion", body
    head, _, rest = whole.partition(b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(head + b"\r\n\r\n" + rest[:5])
        time.sleep(0.3)
        s.sendall(rest[5:])
        [(status, _, body)] = _answers(read_until_closed(s))
    assert status == 200 and json.loads(body)["object"] == "text_completion", body
    ollama = _post("/api/generate", server.token, {**doc, "stream": False}).replace(b"Host: x\r\n", b"Host: x\r\n" + H2C)
    assert _send(server, ollama[:-3], then="shut") == b""  # cut short: a hang-up, as for any request
    time.sleep(0.3)
    assert "Traceback" not in server.output(), server.output()[-3000:]


def test_requests_the_http_layer_does_not_refuse_are_still_answered_by_their_routes(server):
    """The negatives: a whole request, a large head under the bound, and an h2c upgrade without a body are served."""
    [(status, headers, body)] = _answers(_send(server, _get("/v1/models", server.token, b"Connection: close\r\n")))
    assert status == 200 and json.loads(body)["data"][0]["id"] == "m"
    big = _get("/v1/models", server.token, b"X-Big: " + b"a" * 30_000 + b"\r\nConnection: close\r\n")
    assert _answers(_send(server, big))[0][0] == 200
    h2c = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    assert _answers(_send(server, _get("/v1/models", server.token, h2c), then="shut"))[0][0] == 200


def test_a_websocket_upgrade_is_answered_by_its_route_in_json_without_a_log_line(server):
    """Was: uvicorn's WebSocket protocol took every `Upgrade: websocket` request and, with no WebSocket route, refused
    it with a bodiless text/plain 403, logging two lines per request (anyone, no token needed). codemoat has no
    WebSocket route: now the request is answered as the HTTP/1.1 request it also is, by its route, in JSON."""
    ws = b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    for _ in range(3):
        [(status, headers, body)] = _answers(_send(server, _get("/v1/models", None, ws), then="shut"))
        assert status == 401 and headers["content-type"] == "application/json", (status, headers, body)
        assert "token" in _openai_error(json.loads(body))["message"]
    [(status, _, body)] = _answers(_send(server, _get("/api/tags", server.token, ws), then="shut"))
    assert status == 200 and "models" in json.loads(body)
    time.sleep(0.3)
    assert "WebSocket" not in server.output() and "connection rejected" not in server.output(), server.output()[-2000:]


def test_a_client_that_half_closes_after_its_requests_gets_their_answers(server):
    """Was: a client that ended its side after sending a request (`shutdown(SHUT_WR)`: `nc -N`, scripts, some
    health checks) got nothing: uvicorn read the EOF as a hang-up, and the audit log recorded a 200 for the answer
    it never wrote. Now what it sent is answered, pipelined requests in order, then the connection closes; the
    records say 200. Without the half-close the same requests are answered the same (the negative)."""
    before = len(_records(server))
    one = _get("/v1/models", server.token)
    got = _answers(_send(server, one, then="shut"))
    assert [s for s, _, _ in got] == [200] and json.loads(got[0][2])["data"][0]["id"] == "m"
    got = _answers(_send(server, one + _get("/api/tags", server.token), then="shut"))
    assert [s for s, _, _ in got] == [200, 200] and "models" in json.loads(got[1][2])
    assert _answers(_send(server, _get("/health"), then="shut"))[0][0] == 200  # a probe, as a health check sends it
    recs = _records_after(server, before, 3)
    assert [(r["route"], r["status"]) for r in recs] == [("/v1/models", 200), ("/v1/models", 200), ("/api/tags", 200)]
    closed = _answers(_send(server, one.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")))
    assert [s for s, _, _ in closed] == [200]


def test_a_half_close_during_a_generation_still_cancels_it(server):
    """EOF alone cannot tell a half-close from a client gone: a generation in flight when it comes is still cancelled
    (its engine slot freed, 499 recorded with the few tokens made), as the hang-up watch (serve.hangup) did before;
    the half-closed client reads the 499 that says so. A stream is cut the same way."""
    warm = _post("/v1/completions", server.token, {"model": "m", "prompt": "y", "max_tokens": 2})
    assert _answers(_send(server, warm.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")))[0][0] == 200
    before = len(_records(server))
    long = {"model": "m", "prompt": "def f", "max_tokens": 6000, "temperature": 0}
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(_post("/v1/completions", server.token, long))
        time.sleep(1)  # tokens are being made
        s.shutdown(socket.SHUT_WR)
        data = read_until_closed(s)
    status, _, doc = _one(data)
    assert status == 499 and _openai_error(doc)["code"] == "client_closed_request", doc
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(_post("/v1/completions", server.token, {**long, "stream": True}))
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first
        s.shutdown(socket.SHUT_WR)
        rest = read_until_closed(s)
    assert b"[DONE]" not in first + rest
    recs = _records_after(server, before, 2)
    assert [(r["route"], r["status"]) for r in recs] == [("/v1/completions", 499), ("/v1/completions", 200)], recs
    assert 0 < recs[0]["completion_tokens"] < 6000 and 0 < recs[1]["completion_tokens"] < 6000, recs


def _reset(s: socket.socket) -> None:
    """Close `s` with a reset (SO_LINGER 0), as a client killed or cut off by a proxy does."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


GONE = "client gone before its answer was sent"


def test_a_whole_answer_whose_client_is_gone_is_recorded_as_499_not_as_the_200_it_never_got(server):
    """Was: a whole (non-streamed) answer is recorded before it is sent (nothing is served unaudited), and a client gone
    by then was recorded with the answer's status, 200, though uvicorn wrote nothing: two requests pipelined and the
    connection reset gave a record of a 200 nobody got. Now the HTTP layer says whether the client is gone
    (wire.CLIENT_GONE), and such a record says 499 with a note, as a request cut off by a hang-up is recorded."""
    before = len(_records(server))
    conns, deadline = 0, time.monotonic() + HANG
    while conns < 30 and time.monotonic() < deadline:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=HANG)
        s.sendall(_get("/v1/models", server.token) * 2)
        _reset(s)
        conns += 1
        time.sleep(0.2)
        if sum(r["status"] == 499 and r["detail"].get("note") == GONE for r in _records(server)[before:]) >= 3:
            break
    time.sleep(0.3)  # any record still to come from those connections
    # each connection's records: [499 gone]; [200, 499 gone] when its first answer was written before the reset
    # came (a loaded machine); or [200] when uvicorn, the connection closing, never ran the second: never a 200
    # for the second request, which nothing could have reached
    recs = _records(server)[before:]
    got = [(r["status"], r["detail"].get("note")) for r in recs]
    assert got.count((499, GONE)) >= 3 and set(got) <= {(200, None), (499, GONE)}, got
    assert [st for st, _ in got].count(200) <= conns, got
    before += len(recs)
    for _ in range(4):  # closed without a reset: the first answer is written (the client's kernel then resets)
        s = socket.create_connection(("127.0.0.1", server.port), timeout=HANG)
        s.sendall(_get("/v1/models", server.token) * 2)
        s.close()
    time.sleep(1)
    recs = _records(server)[before:]
    got = [(r["status"], r["detail"].get("note")) for r in recs]
    assert [s for s, _ in got].count(200) <= 4 and set(got) <= {(200, None), (499, "client gone before its answer was sent")}, got
    before += len(recs)
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:  # the negative: one read is a 200
        s.sendall(_get("/v1/models", server.token) * 2)
        data = b""
        while data.count(b"HTTP/1.1 200 ") < 2 or not re.search(rb"\}$", data):
            data += s.recv(65536)
    recs = _records_after(server, before, 2)
    assert [r["status"] for r in recs] == [200, 200], recs
    time.sleep(0.3)
    assert "Traceback" not in server.output() and "ASGI callable" not in server.output(), server.output()[-3000:]
