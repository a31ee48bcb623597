# ruff: noqa: F811
"""The HTTP layer's edges, session 25: a request head over the bound however its bytes arrive, and the audit record
of a stream its client hung up on. Real `codemoat serve` on 127.0.0.1, raw sockets."""

from __future__ import annotations

import json
import socket
import time

from rawhttp import HANG, read_until_closed
from test_http_layer import _answers, _get, _one, _openai_error, _post, _records, _records_after, _reset, _send
from test_http_layer import server  # noqa: F401  (its module-scoped fixture, by the name the tests take)

LONG = {"model": "m", "prompt": "def f", "max_tokens": 6000, "temperature": 0}


def _in_two_reads(server, first: bytes, rest: bytes) -> bytes:
    """`first`, a pause (the server reads it alone), then `rest`; what the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(first)
        time.sleep(0.3)
        try:
            s.sendall(rest)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_until_closed(s)


def test_a_head_over_the_bound_that_ends_in_the_read_that_takes_it_over_is_refused(server):
    """Was: the bound was checked only while a head was still arriving, so a head whose last read took it past
    64 KiB and ended it (a whole head in one read, or 60 KiB then the rest) was parsed and served. Now 431 in the
    path's protocol, as for a head cut off while it arrives."""
    head = _get("/api/tags", server.token, b"X-Pad: " + b"a" * (70 << 10) + b"\r\nConnection: close\r\n")
    status, _, doc = _one(_in_two_reads(server, head[: 60 << 10], head[60 << 10 :]))
    assert status == 431 and isinstance(doc["error"], str) and "larger than 65,536 bytes" in doc["error"], doc
    status, _, doc = _one(_send(server, head.replace(b"/api/tags", b"/v1/models")))  # whole, in one write
    assert status == 431 and "larger than" in _openai_error(doc)["message"], doc


def test_very_many_small_headers_over_the_bound_are_refused(server):
    """20,000 headers of three bytes each ("a:b"), 100 KB on the wire: llhttp keeps each one, uvicorn lists each."""
    head = _get("/v1/models", server.token, b"a:b\r\n" * 20_000 + b"Connection: close\r\n")
    status, _, doc = _one(_in_two_reads(server, head[: 50 << 10], head[50 << 10 :]))
    assert status == 431 and "larger than" in _openai_error(doc)["message"], doc


def test_a_large_head_pipelined_behind_a_request_in_the_same_read_is_not_served(server):
    """The second head began in the middle of a read, after the first request: it is not served, and nothing is
    written that the client could take for the first request's answer (the connection closes)."""
    before = len(_records(server))
    big = _get("/api/tags", server.token, b"X-Pad: " + b"a" * (70 << 10) + b"\r\n")
    data = _send(server, _get("/v1/models", server.token) + big)
    assert b"431" not in data.split(b"\r\n", 1)[0] and b'"models"' not in data, data[:300]
    time.sleep(0.5)
    assert "/api/tags" not in [r["route"] for r in _records(server)[before:]]


def test_heads_under_the_bound_are_served_however_they_arrive(server):
    """The negatives: a 60 KiB head in one write and in two; many small headers under the bound; a small head with a
    200 KiB body in the same read (the reads hold more than the bound, the head does not)."""
    near = _get("/v1/models", server.token, b"X-Pad: " + b"a" * (60 << 10) + b"\r\nConnection: close\r\n")
    assert [st for st, _, _ in _answers(_send(server, near))] == [200]
    assert [st for st, _, _ in _answers(_in_two_reads(server, near[:40000], near[40000:]))] == [200]
    many = _get("/v1/models", server.token, b"a:b\r\n" * 10_000 + b"Connection: close\r\n")
    assert [st for st, _, _ in _answers(_send(server, many))] == [200]
    body = {"model": "m", "prompt": "x", "max_tokens": 1, "user": "u" * (200 << 10)}
    req = _post("/v1/completions", server.token, body).replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
    [(status, _, got)] = _answers(_send(server, req))
    assert status == 200 and json.loads(got)["object"] == "text_completion", got[:300]
    time.sleep(0.3)
    assert "Traceback" not in server.output(), server.output()[-3000:]


def _stream_then(server, how: str, path: str = "/v1/completions", doc: dict | None = None) -> bytes:
    """A long stream: its head and a few events read, then the client goes (`how`: "reset" or "close")."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=HANG)
    s.sendall(_post(path, server.token, doc or {**LONG, "stream": True}))
    got = b""
    while got.count(b"\n\n" if path.startswith("/v1") else b"\n") < 6:
        got += s.recv(65536)
    if how == "reset":
        _reset(s)
    else:
        s.close()
    return got


def test_a_stream_cut_by_its_client_is_recorded_as_cut(server):
    """Was: a stream whose client hung up was recorded as a plain 200, no note, as if delivered whole. Now it keeps
    the 200 its head was sent with (the client got that and the first tokens) and says so: "client gone after N
    tokens", N its completion_tokens, fewer than asked for. A reset and a close; OpenAI's SSE and Ollama's NDJSON."""
    before = len(_records(server))
    got = _stream_then(server, "reset")
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]
    _stream_then(server, "close")
    _stream_then(server, "reset", "/api/generate", {"model": "m", "prompt": "def f", "options": {"num_predict": 6000}})
    recs = _records_after(server, before, 3)
    assert [(r["route"], r["status"]) for r in recs] == [
        ("/v1/completions", 200),
        ("/v1/completions", 200),
        ("/api/generate", 200),
    ], recs
    for r in recs:
        assert 0 < r["completion_tokens"] < 6000, r
        assert r["detail"].get("note") == f"client gone after {r['completion_tokens']} tokens", r


def test_a_stream_read_to_its_end_has_no_note(server):
    """The negative: a stream the client reads to [DONE] is recorded as a 200 without a note, its tokens all."""
    before = len(_records(server))
    doc = {"model": "m", "prompt": "def f", "max_tokens": 20, "temperature": 0, "stream": True}
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as s:
        s.sendall(_post("/v1/completions", server.token, doc).replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"))
        data = read_until_closed(s)
    assert b"data: [DONE]" in data
    [rec] = _records_after(server, before, 1)
    assert rec["status"] == 200 and rec["completion_tokens"] == 20 and "note" not in rec["detail"], rec


def _http10(server, path: str, doc: dict) -> tuple[dict, bytes]:
    """`doc` POSTed as HTTP/1.0; the answer's headers and its body as sent, once the server closes."""
    req = _post(path, server.token, doc).replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    head, _, body = _send(server, req).partition(b"\r\n\r\n")
    headers = {k.strip().lower().decode(): v.strip().decode() for k, _, v in (x.partition(b":") for x in head.split(b"\r\n")[1:])}
    return headers, body


def test_a_stream_to_an_http_1_0_client_is_not_chunked(server):
    """Was: a streamed answer to HTTP/1.0 (a client, or a proxy forwarding as 1.0: nginx's default) came chunked,
    which 1.0 does not know: the client read "b3\\r\\n" chunk sizes inside the events. Now the body is the events as
    they are, ended by the connection's close (RFC 9112 6.1); OpenAI's SSE and Ollama's NDJSON."""
    headers, body = _http10(server, "/v1/completions", {"model": "m", "prompt": "def f", "max_tokens": 5, "stream": True})
    assert "transfer-encoding" not in headers and headers["connection"] == "close", headers
    events = body.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""] and all(e.startswith(b"data: {") for e in events[:-2]), body
    assert [json.loads(e[6:])["object"] for e in events[:-2]] == ["text_completion"] * (len(events) - 2)
    headers, body = _http10(server, "/api/generate", {"model": "m", "prompt": "def f", "options": {"num_predict": 5}})
    assert "transfer-encoding" not in headers, headers
    lines = body.decode().splitlines()
    assert all(json.loads(x)["model"] == "m" for x in lines) and json.loads(lines[-1])["done"] is True, body


def test_http_1_1_streams_stay_chunked_and_whole_answers_to_1_0_sized(server):
    """The negatives: HTTP/1.1 streams are chunked as before; a whole answer to 1.0 keeps its Content-Length."""
    req = _post("/v1/completions", server.token, {"model": "m", "prompt": "def f", "max_tokens": 3, "stream": True})
    data = _send(server, req.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"))
    assert b"\r\ntransfer-encoding: chunked" in data.partition(b"\r\n\r\n")[0] and data.endswith(b"\r\n0\r\n\r\n"), data
    headers, body = _http10(server, "/v1/completions", {"model": "m", "prompt": "def f", "max_tokens": 3})
    assert int(headers["content-length"]) == len(body) and json.loads(body)["object"] == "text_completion", headers


def _chunked(server, path: str, token: str | None, doc: dict, trailers: bytes) -> bytes:
    body = json.dumps(doc).encode()
    auth = b"Authorization: Bearer %s\r\n" % token.encode() if token else b""
    head = b"POST %s HTTP/1.1\r\nHost: x\r\n%sContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n" % (
        path.encode(),
        auth,
    )
    return head + b"Connection: close\r\n\r\n%x\r\n%s\r\n0\r\n" % (len(body), body) + trailers + b"\r\n"


def test_trailers_over_the_head_bound_are_refused(server):
    """Was: a chunked body's trailers were appended to the request's headers without bound (the head's bound was
    over once the head was parsed). Now they count as a head's bytes: 100 KB of 3-byte trailers get 431."""
    req = _chunked(server, "/v1/completions", server.token, {"model": "m", "prompt": "y", "max_tokens": 2}, b"a:b\r\n" * 20_000)
    cut = req.index(b"0\r\na:b") + 40
    status, _, doc = _one(_in_two_reads(server, req[:cut], req[cut:]))
    assert status == 431 and "larger than" in _openai_error(doc)["message"], doc


def test_a_trailer_is_not_a_header_of_the_request(server):
    """Was: a trailer joined the headers the app had read: a token sent in a trailer of a request no route
    authenticates (a 404) named its caller in the audit record. Now trailers are dropped: the 404's record names
    nobody. The negative: a small trailer does not stop a request from being served."""
    before = len(_records(server))
    trailer = b"Authorization: Bearer %s\r\n" % server.token.encode()
    [(status, _, _)] = _answers(_send(server, _chunked(server, "/v1/nowhere", None, {"a": 1}, trailer)))
    assert status == 404
    doc = {"model": "m", "prompt": "y", "max_tokens": 2}
    [(status, _, body)] = _answers(_send(server, _chunked(server, "/v1/completions", server.token, doc, b"X-T: 1\r\n")))
    assert status == 200 and json.loads(body)["object"] == "text_completion", body
    recs = _records_after(server, before, 2)
    assert [(r["route"], r["user"]) for r in recs] == [("unmatched", None), ("/v1/completions", "dev")], recs
