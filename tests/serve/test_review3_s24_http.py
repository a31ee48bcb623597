# ruff: noqa: F811
"""Review of 5ee769c (HTTP layer): hang-ups that are not half-closes, keep-alive sequences, and h2c bodies followed by
bytes that would be a second request. Real `codemoat serve` on 127.0.0.1, raw sockets."""

from __future__ import annotations

import json
import socket
import time

from rawhttp import HANG, read_until_closed
from test_http_layer import _answers, _get, _post, _records, _records_after, _reset
from test_http_layer import server  # noqa: F401  (its module-scoped fixture, by the name the tests take)

LONG = {"model": "m", "prompt": "def f", "max_tokens": 6000, "temperature": 0}


def _h2c(token: str, doc: dict) -> bytes:
    return _post("/v1/completions", token, doc).replace(
        b"Host: x\r\n",
        b"Host: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
    )


def test_a_client_that_closes_during_a_non_streamed_generation_after_a_keep_alive_answer_cancels_it(server):
    before = len(_records(server))
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(_get("/v1/models", server.token))
        data = b""
        while b'"object"' not in data:
            data += s.recv(65536)
        s.sendall(_post("/v1/completions", server.token, LONG))
        time.sleep(1)
    recs = _records_after(server, before, 2)
    assert [(r["route"], r["status"]) for r in recs] == [("/v1/models", 200), ("/v1/completions", 499)], recs
    assert 0 < recs[1]["completion_tokens"] < 6000, recs


def test_a_reset_during_a_stream_cancels_it(server):
    before = len(_records(server))
    s = socket.create_connection(("127.0.0.1", server.port), timeout=HANG)
    s.sendall(_post("/v1/completions", server.token, {**LONG, "stream": True}))
    assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    _reset(s)
    [rec] = _records_after(server, before, 1)
    assert rec["completion_tokens"] < 6000, rec


def test_bytes_after_an_h2c_body_are_not_served_as_a_second_request(server):
    before = len(_records(server))
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(_h2c(server.token, {"model": "m", "prompt": "y", "max_tokens": 300, "temperature": 0}))
        time.sleep(0.3)
        s.sendall(_get("/v1/models", server.token))
        got = _answers(read_until_closed(s))
    assert [st for st, _, _ in got] == [200], got
    assert json.loads(got[0][2])["object"] == "text_completion"
    time.sleep(0.5)
    assert [r["route"] for r in _records(server)[before:]] == ["/v1/completions"]


def test_an_h2c_body_shorter_than_its_content_length_then_a_half_close_ends(server):
    body = json.dumps({"model": "m", "prompt": "y", "max_tokens": 2}).encode()
    head = _h2c(server.token, {"model": "m", "prompt": "y", "max_tokens": 2}).split(b"\r\n\r\n")[0]
    head = head.replace(b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 50))
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(head + b"\r\n\r\n" + body)
        s.shutdown(socket.SHUT_WR)
        read_until_closed(s)  # closes, does not hang


def test_a_client_that_pipelines_behind_a_generation_then_closes_cancels_it(server):
    before = len(_records(server))
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(_post("/v1/completions", server.token, LONG) + _get("/v1/models", server.token))
        time.sleep(1)
    recs = _records_after(server, before, 1)
    assert recs[0]["status"] == 499 and recs[0]["completion_tokens"] < 6000, recs


def test_a_client_that_pipelines_behind_a_generation_then_resets_cancels_it(server):
    before = len(_records(server))
    s = socket.create_connection(("127.0.0.1", server.port), timeout=HANG)
    s.sendall(_post("/v1/completions", server.token, LONG) + _get("/v1/models", server.token))
    time.sleep(1)
    _reset(s)
    recs = _records_after(server, before, 1)
    assert recs[0]["status"] == 499 and recs[0]["completion_tokens"] < 6000, recs


_WS = b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
_H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"


def test_a_request_pipelined_behind_a_bodiless_upgrade_request_is_answered(server):
    """Was: llhttp stops at an upgrade request's head, and the bytes after it in the same read (a request pipelined
    behind it) were dropped: one answer, then the idle close. Each upgrade kind, and a plain request before it (the
    negative: pipelining itself always worked)."""
    last = _get("/api/tags", server.token, b"Connection: close\r\n")
    for extra in (_WS, _H2C, b""):
        with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
            s.sendall(_get("/v1/models", server.token, extra) + last)
            got = _answers(read_until_closed(s))
        assert [st for st, _, _ in got] == [200, 200], (extra, got)
        assert "models" in json.loads(got[1][2])


def test_many_upgrade_requests_in_one_read_are_each_answered(server):
    n = 300
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(_get("/health", None, _H2C) * n + _get("/health", None, b"Connection: close\r\n"))
        got = _answers(read_until_closed(s))
    assert [st for st, _, _ in got] == [200] * (n + 1)
    assert "Traceback" not in server.output()


def test_bytes_after_an_h2c_body_in_the_same_read_are_not_served_either(server):
    """The negative beside the pipelined-after-upgrade fix: after an upgrade request's body the connection closes
    once it is answered, whatever follows in the same read (a proxy's next client, a smuggled request)."""
    before = len(_records(server))
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(_h2c(server.token, {"model": "m", "prompt": "y", "max_tokens": 2}) + _get("/v1/models", server.token))
        got = _answers(read_until_closed(s))
    assert [st for st, _, _ in got] == [200] and json.loads(got[0][2])["object"] == "text_completion", got
    assert [r["route"] for r in _records_after(server, before, 1)] == ["/v1/completions"]
