"""serve/wire.py: a response's head leaves in the same write as its first body, through a real uvicorn on
127.0.0.1 read by a raw socket."""

from __future__ import annotations

import socket
import threading
import time

import anyio
import uvicorn

from codemoat.serve.wire import HttpProtocol


def _serving(app, port: int):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=HttpProtocol, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started and t.is_alive():
        time.sleep(0.02)
    return server, t


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_the_head_waits_for_the_first_body_and_leaves_with_it(free_port):
    go = threading.Event()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await anyio.to_thread.run_sync(go.wait, 30)  # the first token is still being made
        await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    server, t = _serving(app, free_port)
    try:
        with socket.create_connection(("127.0.0.1", free_port), timeout=30) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            s.settimeout(0.5)
            try:
                early = s.recv(65536)
            except TimeoutError:
                early = b""
            assert early == b"", f"the head went out alone before the first body: {early!r}"
            go.set()
            s.settimeout(30)
            first = s.recv(65536)  # one write: the head and the first event together
            assert first.startswith(b"HTTP/1.1 200 OK\r\n"), first
            head, _, body = first.partition(b"\r\n\r\n")
            assert b"content-type: text/event-stream" in head and b"transfer-encoding: chunked" in head
            assert body.startswith(b"d\r\ndata: first\n\n\r\n"), first
            rest = body + _read_all(s)
            assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), rest
    finally:
        go.set()
        server.should_exit = True
        t.join(timeout=10)


def test_a_100_continue_still_goes_out_before_the_head_and_sized_answers_keep_their_length(free_port):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            m = await receive()  # the first read answers the client's Expect: 100-continue
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        answer = b"got " + body
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": answer, "more_body": False})

    server, t = _serving(app, free_port)
    try:
        with socket.create_connection(("127.0.0.1", free_port), timeout=30) as s:
            s.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
            assert s.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
            s.sendall(b"hello")
            reply = _read_all(s)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 201 Created\r\n") and b"content-length: 9" in head
        assert body == b"got hello"
    finally:
        server.should_exit = True
        t.join(timeout=10)


def test_answers_to_head_and_on_kept_alive_connections_are_whole(free_port):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})

    server, t = _serving(app, free_port)
    try:
        with socket.create_connection(("127.0.0.1", free_port), timeout=30) as s:
            # uvicorn writes no body for HEAD: the head must still go out, then the next answer on the connection
            s.sendall(b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            both = _read_all(s)
        first, _, second = both.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 2" in first, both
        assert second.startswith(b"HTTP/1.1 200 OK\r\n") and second.endswith(b"\r\n\r\nok"), both
        with socket.create_connection(("127.0.0.1", free_port), timeout=30) as s:  # a HEAD, then the close
            s.sendall(b"HEAD /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            only = _read_all(s)
        assert only.startswith(b"HTTP/1.1 200 OK\r\n") and only.endswith(b"\r\n\r\n"), only
    finally:
        server.should_exit = True
        t.join(timeout=10)
