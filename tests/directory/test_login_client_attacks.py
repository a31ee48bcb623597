"""`codemoat login` against a hostile server (or a hostile OpenID provider, whose device answer the server relays):
the start's user code and verification URI were printed to the developer's terminal as sent, escape sequences
included (an OSC 52 sequence writes the clipboard; others rewrite what the screen shows), and with --browser any URI
was handed to the system's opener, file:// and other schemes included. Now the start is checked first: a one-line
refusal, nothing printed from it, no browser. A real HTTP server on 127.0.0.1 plays the server; $BROWSER records
what would have been opened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler

import pytest
from devicestart import DEVICE_START
from localhttp import LocalHTTP

CODEMOAT = [sys.executable, "-m", "codemoat.cli.main"]
GOOD = DEVICE_START


@pytest.mark.parametrize(
    "edit",
    [
        {"user_code": "ABCD\x1b]52;c;ZWNobyBwd25lZA==\x07"},
        {"verification_uri": "file:///etc/passwd"},
        {"verification_uri_complete": "javascript:alert(1)"},
        {"issuer": "\x1b[2J\x1b[Hcodemoat: all good"},
        {"expires_in": "soon"},
    ],
    ids=["escape-in-code", "file-uri", "javascript-uri", "escape-in-issuer", "expiry-not-a-number"],
)
def test_a_hostile_device_start_is_refused_before_anything_is_shown_or_opened(tmp_path, home, edit):
    start = json.dumps(GOOD | edit).encode()

    class Server(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = start if self.path == "/auth/device/start" else b'{"error": "access_denied"}'
            self.send_response(200 if self.path == "/auth/device/start" else 400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    opened = tmp_path / "opened"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\nprintf "%s" "$1" > {opened}\n')
    browser.chmod(0o755)
    with LocalHTTP(Server) as srv:
        r = subprocess.run(
            [*CODEMOAT, "login", "--server", srv.url, "--browser"],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, CODEMOAT_HOME=str(home), BROWSER=str(browser)),
        )
    assert r.returncode == 1
    assert "\x1b" not in r.stdout + r.stderr and "\x07" not in r.stdout + r.stderr
    assert not opened.exists(), opened.read_text()
    assert "malformed" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
