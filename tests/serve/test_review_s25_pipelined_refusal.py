# ruff: noqa: F811
"""Review of the session-25 HTTP layer: a refusal of a request pipelined behind one still unanswered is not written,
whatever part of it is refused (its head, its body, its trailers): the client would read it as the earlier
request's answer; a chunked body's trailers count against the head's bound from their first byte. Real
`codemoat serve` on 127.0.0.1, raw sockets."""

from __future__ import annotations

import json
import socket
import time

from rawhttp import HANG, read_until_closed
from test_http_layer import _answers, _one, _openai_error, _post, _send
from test_http_layer import server  # noqa: F401  (its module-scoped fixture, by the name the tests take)

SLOW = {"model": "m", "prompt": "def f", "max_tokens": 300, "temperature": 0}


def _chunked(server, body: bytes, trailers: bytes = b"") -> bytes:
    """A chunked POST of `body` as one chunk (bytes as they go on the wire after the head), with `trailers`."""
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
    return head % server.token.encode() + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body + trailers


def _first_status(data: bytes) -> bytes:
    return data.split(b"\r\n", 1)[0]


def test_a_refused_body_or_trailers_behind_an_unanswered_request_is_not_its_answer(server):
    """Was: a request queued behind another (pipelined, in the same write) whose trailers were over the bound got
    its 431, and one whose chunked body could not be parsed its 400, written at once, before the first request's
    answer: the client took it for the first request's answer. Now, as for a refused head, nothing is written."""
    doc = json.dumps({"a": 1}).encode()
    trailers = _chunked(server, b"%x\r\n%s\r\n0\r\n" % (len(doc), doc), b"a:b\r\n" * 20_000 + b"\r\n")
    bad_body = _chunked(server, b"zz\r\n")
    firsts = [
        _first_status(_send(server, _post("/v1/completions", server.token, SLOW) + second)) for second in (trailers, bad_body)
    ]
    assert not [f for f in firsts if f.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400"))], firsts


def test_a_refused_body_or_trailers_of_a_request_alone_is_answered(server):
    """The negatives: the same requests sent alone (nothing before them unanswered) get their 431 and 400."""
    doc = json.dumps({"a": 1}).encode()
    status, _, got = _one(_send(server, _chunked(server, b"%x\r\n%s\r\n0\r\n" % (len(doc), doc), b"a:b\r\n" * 20_000 + b"\r\n")))
    assert status == 431 and "larger than" in _openai_error(got)["message"], got
    status, _, got = _one(_send(server, _chunked(server, b"zz\r\n")))
    assert status == 400 and "cannot be parsed" in _openai_error(got)["message"], got


def _chunked_then(server, pieces: list[bytes]) -> bytes:
    """A chunked POST's head, then each piece in a write of its own, a pause between (so that each is read alone);
    what the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(_chunked(server, b""))
        try:
            for piece in pieces:
                time.sleep(0.05)
                s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_until_closed(s)


def test_a_first_trailer_that_never_ends_is_refused_at_the_bound(server):
    """Was: trailers counted against the head's bound only from the first whole one on, and httptools gathers a
    trailer's line until it ends: a first trailer that never ended was read into memory whole, for as long as its
    bytes came faster than the read deadline's 1 KiB/s (60 MiB sent: +94 MB RSS). Now the reads after the last
    chunk's size line count from the first: 431 once past the bound."""
    pieces = [b"2\r\n{}\r\n0\r\nX-T: ", *[b"a" * (64 << 10)] * 64]
    status, _, doc = _one(_chunked_then(server, pieces))
    assert status == 431 and "larger than" in _openai_error(doc)["message"], doc


def test_chunks_larger_than_the_bound_read_apart_from_their_size_lines_are_served(server):
    """The negative: chunks of 100 KiB each, each size line read before its data (no data after it in that read),
    and a small trailer: a whole answer, not a 431."""
    prompt = "y" * (100 << 10)
    body = json.dumps({"model": "m", "prompt": "def f", "max_tokens": 1, "user": prompt * 2}).encode()
    parts = [body[i : i + (100 << 10)] for i in range(0, len(body), 100 << 10)]
    pieces = [p for part in parts for p in (b"%x\r\n" % len(part), part + b"\r\n")] + [b"0\r\n", b"X-T: 1\r\n\r\n"]
    [(status, _, got)] = _answers(_chunked_then(server, pieces))
    assert status == 200 and json.loads(got)["object"] == "text_completion", got[:300]


def test_trailers_under_the_bound_on_each_of_two_requests_of_a_connection_are_served(server):
    """The negative: 40 KB of trailers on each of two chunked requests on one connection (80 KB together), the second's
    first trailer's start read alone: each request's trailers are counted alone, both are answered."""
    doc = json.dumps({"model": "m", "prompt": "def f", "max_tokens": 1}).encode()
    head = _chunked(server, b"").replace(b"Connection: close\r\n", b"")
    trailers = b"a:b\r\n" * 8_000 + b"\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(head + b"%x\r\n%s\r\n0\r\n" % (len(doc), doc) + trailers)
        got = b""
        while got.count(b"text_completion") < 1:
            got += s.recv(65536)
        s.sendall(
            head.replace(b"Transfer-Encoding", b"Connection: close\r\nTransfer-Encoding") + b"%x\r\n%s\r\n0\r\n" % (len(doc), doc)
        )
        for piece in (trailers[:2], trailers[2:]):  # a read of the first trailer's start alone, then the rest
            time.sleep(0.05)
            s.sendall(piece)
        got += read_until_closed(s)
    assert [st for st, _, _ in _answers(got)] == [200, 200], got[:600]
