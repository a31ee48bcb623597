"""An outside attacker's review of the key server's HTTP reading: connections that never finish a request.

Was broken: uvicorn sets no deadline on a request, so a connection left silent, a head stopped halfway or
a body short of its Content-Length was held for good. The key server faces every customer's machines: a
few hundred such connections used every descriptor it had (200 here, 1,024 under systemd's default) and
no machine got a lease or a renewal until they went. A head had no bound either (one 300 MiB header
line was read into memory whole). Now (serve.readguard, `codemoat keyserver --read-timeout`) each gets
408 in one line and is closed, a head over 64 KiB gets 431, and the server answers again once the
deadline has passed, with one worker or several.

Waits are bounded by HANG, many times the 2 s deadline set here: a hang is the failure, not a slow answer.
"""

from __future__ import annotations

import contextlib
import re
import resource
import socket
import subprocess
import sys
import time

import httpx

from codemoat.vault.vendor import Vendor
from ports import free_port
from rawhttp import HANG, read_until_closed


@contextlib.contextmanager
def keyserver(vendor_dir, *extra: str, files: int | None = None):
    """`codemoat keyserver --read-timeout 2` on a free port (at most `files` descriptors): yields the port; what it
    writes goes to keyserver.log beside `vendor_dir`."""
    port = free_port()

    def limit() -> None:
        if files:
            resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    cmd = [sys.executable, "-m", "codemoat.cli.main", "keyserver", "--vendor", str(vendor_dir), "--port", str(port)]
    log = open(vendor_dir.parent / "keyserver.log", "w")
    proc = subprocess.Popen([*cmd, "--read-timeout", "2", *extra], stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit)
    try:
        assert _answered(port), "the key server did not start"
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _answered(port: int, seconds: float = HANG) -> bool:
    """Whether a lease challenge got the key server's signed answer within `seconds` (tries again and again)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/lease/challenge", json={"license_id": "nope"}, timeout=2)
            if r.status_code < 500 and "signature" in r.json():
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    return False


_answer = read_until_closed  # everything until the server closes (the test fails after HANG s)


UNFINISHED = [
    b"",
    b"POST /v1/lease HTTP/1.1\r\nHost: k\r\n",
    b'POST /v1/lease HTTP/1.1\r\nHost: k\r\nContent-Length: 400\r\n\r\n{"license_id": ',
    b'POST /v1/lease HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"li\r\n',
]


def test_unfinished_requests_cannot_hold_every_descriptor(tmp_path):
    Vendor.init(tmp_path / "vendor").close()
    with keyserver(tmp_path / "vendor", files=200) as port:
        held = []
        for i in range(300):  # more than the server's descriptors: the kernel queues the rest
            s = socket.create_connection(("127.0.0.1", port), timeout=HANG)
            s.sendall(UNFINISHED[i % len(UNFINISHED)])
            held.append(s)
        try:
            assert _answered(port), f"no lease challenge answered for {HANG} s while 300 unfinished requests were open"
            for s in held[:8]:
                data = _answer(s)
                assert data.startswith(b"HTTP/1.1 408 ") and b"request not received in time" in data, data[:300]
        finally:
            for s in held:
                s.close()


def test_several_workers_refuse_unfinished_requests_and_huge_heads(tmp_path):
    Vendor.init(tmp_path / "vendor").close()
    with keyserver(tmp_path / "vendor", "--workers", "2") as port:
        for sent in UNFINISHED:
            with socket.create_connection(("127.0.0.1", port), timeout=HANG) as s:
                s.sendall(sent)
                data = _answer(s)
            assert re.match(rb"HTTP/1\.1 408 ", data), (sent, data[:300])
        with socket.create_connection(("127.0.0.1", port), timeout=HANG) as s:
            s.sendall(b"POST /v1/lease HTTP/1.1\r\nHost: k\r\nX-Huge: ")
            try:
                for _ in range(64):
                    s.sendall(b"a" * (1 << 20))
            except (BrokenPipeError, ConnectionResetError):
                pass
            data = _answer(s)
        assert data.startswith(b"HTTP/1.1 431 ") and b"request head is larger than 65,536 bytes" in data, data[:300]
        assert _answered(port)  # and a whole request is answered at once


def test_a_websocket_upgrade_is_refused_at_the_handshake_without_a_log_line(tmp_path):
    """Was: the app returned without a word on a WebSocket scope, so uvicorn (websockets installed) answered 500
    and logged 'ASGI callable returned without completing handshake' at ERROR, one line per attempt."""
    Vendor.init(tmp_path / "vendor").close()
    key = b"MDEyMzQ1Njc4OWFiY2RlZg=="
    upgrade = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n" % key
    with keyserver(tmp_path / "vendor", "--log-level", "warning") as port:
        for path in (b"/v1/lease", b"/health", b"/nowhere"):
            with socket.create_connection(("127.0.0.1", port), timeout=HANG) as s:
                s.sendall(b"GET %s HTTP/1.1\r\nHost: k\r\n%s\r\n" % (path, upgrade))
                data = _answer(s)
            assert data.startswith(b"HTTP/1.1 403 "), (path, data[:300])
        assert _answered(port)
    log = (tmp_path / "keyserver.log").read_text()
    assert "ERROR" not in log and "Traceback" not in log, log[-2000:]
