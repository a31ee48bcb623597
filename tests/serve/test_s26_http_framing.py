# ruff: noqa: F811
"""The HTTP layer's framing rules, session 26 (RFC 9112): a request's Host header and Transfer-Encoding, read as a
proxy in front may read them, so that no bytes taken for one request's body are served as a second, hidden request
(request smuggling); and the layer's refusals counted. Real `codemoat serve` on 127.0.0.1, raw sockets; the counter
through a real uvicorn with the same protocol."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest
import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from rawhttp import HANG, read_until_closed
from test_http_layer import _answers, _get, _one, _openai_error, _records, _send
from test_http_layer import server  # noqa: F401  (its module-scoped fixture, by the name the tests take)

from codemoat.serve.wire import HttpProtocol

#: a whole chunked body: one chunk of a JSON completion request, then the last chunk
DOC = json.dumps({"model": "m", "prompt": "def f", "max_tokens": 1, "temperature": 0}).encode()
CHUNKED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(DOC), DOC)


def _post_framed(server, framing: bytes, body: bytes = CHUNKED) -> bytes:
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
    return head % server.token.encode() + framing + b"\r\n" + body


def _hidden(server) -> bytes:
    """The request a lax reading of the first one's framing would find in its body, and serve."""
    return _get("/api/tags", server.token, b"Connection: close\r\n")


def test_an_http_1_1_request_without_one_host_header_is_refused(server):
    """Was: an HTTP/1.1 request with no Host header, or with two, was served (RFC 9112 section 3.2: 400). Now 400 in
    the path's protocol, the connection closed, nothing of it seen by a route."""
    before = len(_records(server))
    no_host = b"GET /api/tags HTTP/1.1\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n" % server.token.encode()
    status, _, doc = _one(_send(server, no_host))
    assert status == 400 and isinstance(doc["error"], str) and "one Host header" in doc["error"], doc  # Ollama's shape
    two = _get("/v1/models", server.token, b"Host: y\r\nConnection: close\r\n")
    status, _, doc = _one(_send(server, two))
    assert status == 400 and "it has 2" in _openai_error(doc)["message"], doc
    absolute = b"GET http://x/v1/models HTTP/1.1\r\nAuthorization: Bearer %s\r\n\r\n" % server.token.encode()
    status, _, doc = _one(_send(server, absolute))  # the absolute form names a host, but the header is still due
    assert status == 400 and "one Host header" in _openai_error(doc)["message"], doc
    later = b"GET /v1/models HTTP/2.0\r\nAuthorization: Bearer %s\r\n\r\n" % server.token.encode()
    status, _, doc = _one(_send(server, later))  # a version after 1.1, as llhttp reads one: a Host is due too
    assert status == 400 and "an HTTP/2.0 request needs one Host header" in _openai_error(doc)["message"], doc
    http10_two = _get("/v1/models", server.token, b"Host: y\r\n").replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n")
    status, _, doc = _one(_send(server, http10_two))  # HTTP/1.0 may send none, not two; the line names its version
    assert status == 400 and "an HTTP/1.0 request needs one Host header" in _openai_error(doc)["message"], doc
    time.sleep(0.3)
    assert not [r for r in _records(server)[before:] if r["route"] in ("/api/tags", "/v1/models")]


def test_requests_with_their_host_or_of_http_1_0_without_one_are_still_served(server):
    """The negatives: HTTP/1.0 needs no Host; an empty Host (a target with no authority) is one Host; Host in any case."""
    http10 = b"GET /api/tags HTTP/1.0\r\nAuthorization: Bearer %s\r\n\r\n" % server.token.encode()
    [(status, _, body)] = _answers(_send(server, http10))
    assert status == 200 and b'"models"' in body, body[:300]
    empty = _get("/api/tags", server.token, b"Connection: close\r\n").replace(b"Host: x\r\n", b"hOsT:\r\n")
    [(status, _, body)] = _answers(_send(server, empty))
    assert status == 200 and b'"models"' in body, body[:300]


def test_a_transfer_encoding_other_than_chunked_alone_is_refused_and_the_request_behind_it_never_served(server):
    """Was: `Transfer-Encoding: identity, chunked` and `gzip, chunked` (and the same over two lines, or `,chunked`)
    were read as chunked, the codings before ignored: a proxy that reads them otherwise frames the body differently,
    and the server served a second request the proxy never saw. Now 501 (a coding not implemented, RFC 9112 section
    6.1) or 400 (not a list of codings), the connection closed: the pipelined request behind it is never served."""
    before = len(_records(server))
    unknown, malformed, unparsed = (501, "chunked, alone"), (400, "not a list of transfer codings"), (400, "cannot be parsed")
    for framing, (want, says) in (
        (b"Transfer-Encoding: identity, chunked\r\n", unknown),
        (b"Transfer-Encoding: gzip, chunked\r\n", unknown),
        (b"Transfer-Encoding: GZIP,Chunked\r\n", unknown),
        (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", unknown),
        (b"Transfer-Encoding: x-custom;q=1 , chunked\r\n", unknown),
        (b"Transfer-Encoding: gzip\r\n", unknown),  # before: llhttp's 400, after the app had started
        (b"Transfer-Encoding: ,chunked\r\n", malformed),
        (b"Transfer-Encoding: a b, chunked\r\n", malformed),
        (b"Transfer-Encoding: chunked, , chunked\r\n", unparsed),  # llhttp's own: chunked twice
    ):
        data = _send(server, _post_framed(server, framing) + _hidden(server))
        status, _, doc = _one(data)  # one answer, and the connection closed
        assert status == want and says in _openai_error(doc)["message"], (framing, status, doc)
        assert b'"models"' not in data, data[:300]
    time.sleep(0.3)
    assert not [r for r in _records(server)[before:] if r["route"] in ("/api/tags", "/v1/completions")]


def test_an_http_1_0_request_with_a_transfer_encoding_is_refused_and_the_request_behind_it_never_served(server):
    """Was: an HTTP/1.0 request with `Transfer-Encoding: chunked` was read as chunked and served, though HTTP/1.0 has
    no such coding and RFC 9112 section 6.1 calls its framing faulty: a proxy that goes by its Content-Length (or
    reads to the close) finds the chunked bytes' end elsewhere. Now 400 naming the version, the connection closed,
    nothing of it or behind it served. The negative: HTTP/1.0 with a Content-Length is served."""
    before = len(_records(server))
    cannot, unparsed = "an HTTP/1.0 request cannot carry a Transfer-Encoding", "cannot be parsed"
    for framing, says in (
        (b"Transfer-Encoding: chunked\r\n", cannot),
        (b"Transfer-Encoding: gzip, chunked\r\n", cannot),
        (b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", unparsed),  # llhttp's own, before this check
    ):
        request = _post_framed(server, framing).replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
        data = _send(server, request + _hidden(server))
        status, _, doc = _one(data)
        assert status == 400 and says in _openai_error(doc)["message"], (framing, doc)
        assert b'"models"' not in data, data[:300]
    time.sleep(0.3)
    assert not [r for r in _records(server)[before:] if r["route"] in ("/api/tags", "/v1/completions")]
    with_length = _post_framed(server, b"Content-Length: %d\r\n" % len(DOC), DOC).replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    [(status, _, body)] = _answers(_send(server, with_length))
    assert status == 200 and json.loads(body)["object"] == "text_completion", body[:300]


def test_framing_llhttp_already_refuses_stays_refused(server):
    """Transfer-Encoding beside a Content-Length (either order), and `chunked` twice: llhttp refuses them itself (400,
    the connection closed); the pipelined request behind is not served either."""
    for framing in (
        b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % len(CHUNKED),
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked, chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked, gzip\r\n",
    ):
        data = _send(server, _post_framed(server, framing) + _hidden(server))
        status, _, doc = _one(data)
        assert status == 400 and "cannot be parsed" in _openai_error(doc)["message"], (framing, doc)
        assert b'"models"' not in data


def test_a_single_chunked_coding_and_a_content_length_are_still_served_with_the_request_behind(server):
    """The negatives: `chunked` in any case and with whitespace, and a Content-Length: each request served, and the
    one pipelined behind it too (two answers on one connection)."""
    for framing, body in (
        (b"Transfer-Encoding: chunked\r\n", CHUNKED),
        (b"Transfer-Encoding: \tChunked  \r\n", CHUNKED),
        (b"transfer-encoding: CHUNKED\r\n", CHUNKED),
        (b"Content-Length: %d\r\n" % len(DOC), DOC),
    ):
        answers = _answers(_send(server, _post_framed(server, framing, body) + _hidden(server)))
        assert [st for st, _, _ in answers] == [200, 200], (framing, answers)
        assert json.loads(answers[0][2])["object"] == "text_completion" and b'"models"' in answers[1][2]
    assert "Traceback" not in server.output(), server.output()[-3000:]


def _serving(port: int):
    from codemoat.serve.readguard import guarded

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    protocol = guarded(HttpProtocol, 2)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, log_level="warning", lifespan="off"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started and t.is_alive():
        time.sleep(0.02)
    return server, t, protocol


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=HANG) as s:
        s.sendall(data)
        return read_until_closed(s)


def test_the_http_layers_refusals_are_counted_by_status(free_port):
    """Was: a request refused here (400, 408, 431, 501) left no trace, neither log line nor metric. Now each is
    counted by status, `codemoat_http_refused_total{status="..."}` in a registry the server's collector is in;
    the negative: requests served are not counted, and each server (each `guarded` class) counts its own."""
    from codemoat.serve.readguard import RefusedCollector, guarded  # here: the other tests run without it

    server, t, protocol = _serving(free_port)
    registry = CollectorRegistry()
    registry.register(RefusedCollector(protocol))
    try:
        assert _raw(free_port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").endswith(b"ok")
        assert b"codemoat_http_refused_total{" not in generate_latest(registry)
        _raw(free_port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        _raw(free_port, b"GARBAGE\r\n\r\n")
        _raw(free_port, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
        text = generate_latest(registry).decode()
        assert 'codemoat_http_refused_total{status="400"} 2.0' in text, text
        assert 'codemoat_http_refused_total{status="501"} 1.0' in text, text
        assert not guarded(HttpProtocol).refused  # another server's class: its own counts
    finally:
        server.should_exit = True
        t.join(10)


def test_codemoat_serve_shows_the_refusals_on_its_metrics(server):
    """`codemoat serve`'s own /metrics shows the HTTP layer's refusals (serve/run.py registers the collector): a
    request with two Host headers moves its 400 count by one; a request served does not move it."""
    import httpx
    from conftest import create_token

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CODEMOAT_HOME", str(server.home))
        scrape = {"Authorization": f"Bearer {create_token('--name', 'scraper', '--scopes', 'metrics')}"}

    def count() -> float:
        text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", headers=scrape, timeout=30).text
        m = re.search(r'^codemoat_http_refused_total\{status="400"\} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    before = count()
    status, _, _ = _one(_send(server, _get("/v1/models", server.token, b"Host: y\r\nConnection: close\r\n")))
    assert status == 400
    assert count() == before + 1
    status, _, _ = _one(_send(server, _get("/v1/models", server.token, b"Connection: close\r\n")))
    assert status == 200
    assert count() == before + 1
