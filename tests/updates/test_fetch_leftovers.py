"""An on-path proxy that cuts a bundle's download short (its Content-Length promised more than it sent, then the
connection closed): httpx raised RemoteProtocolError inside the download, which the fetch turned into one line,
but the partial download stayed in the inbox (only a timeout or a refused status removed it). A proxy naming a
new bundle each time left one more each `update fetch`, each as large as the index said, until the inbox's file
system was down to the space a fetch leaves free. Now a download that fails in any way leaves nothing."""

from __future__ import annotations

import hashlib
import json
from http.server import BaseHTTPRequestHandler

import pytest
from localhttp import LocalHTTP

from codemoat.errors import CodemoatError
from codemoat.updates import channel as ch

MB = 1 << 20


def _cut_short(name: str, size: int):
    class Channel(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            if self.path == "/index.json":
                body = json.dumps([{"file": name, "size": size, "sha256": hashlib.sha256(b"\0" * size).hexdigest()}])
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())
                return
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.write(b"\0" * (size // 2))
            self.close_connection = True

    return Channel


def test_a_download_cut_short_leaves_nothing_in_the_inbox(home):
    inbox = home / "updates" / "inbox"
    for i in range(3):  # a new name each fetch: before, one more partial download each time
        with LocalHTTP(_cut_short(f"flood-{i}.moatpkg", 4 * MB)) as srv:
            with pytest.raises(CodemoatError) as e:
                ch.fetch(srv.url, inbox)
        assert "unreachable" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in inbox.iterdir()) == []


def test_a_password_in_the_channel_url_is_sent_but_never_logged(home):
    """A channel behind basic auth (`update.channel_url = "http://user:PASSWORD@host/"`): httpx sends the user and
    password from the URL. Before, the URL went whole into the outbound log (each request, before it left, and
    its answer) and into the one-line error of a fetch that failed. Now both name the URL without them."""
    import base64

    from codemoat import paths

    got: list[str] = []

    class Channel(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            got.append(self.headers.get("Authorization", ""))
            if self.path.endswith("/index.json"):
                body = json.dumps([{"file": "a.moatpkg", "size": 10, "sha256": "0" * 64}]).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

    with LocalHTTP(Channel) as srv:
        url = srv.url.replace("http://", "http://vendor-user:s3cr3t-Pa55@") + "/chan"
        with pytest.raises(CodemoatError) as e:
            ch.fetch(url, home / "updates" / "inbox")
    assert got == ["Basic " + base64.b64encode(b"vendor-user:s3cr3t-Pa55").decode()] * 2  # sent as before
    assert "503" in str(e.value) and "s3cr3t" not in str(e.value)
    log = paths.outbound_log().read_text()
    assert f"127.0.0.1:{srv.port}/chan/index.json" in log and f"127.0.0.1:{srv.port}/chan/a.moatpkg" in log
    assert "s3cr3t" not in log and "vendor-user" not in log
    with pytest.raises(CodemoatError) as e:  # nothing listens there now: the unreachable channel's line
        ch.fetch(url, home / "updates" / "inbox")
    assert "unreachable" in str(e.value) and "s3cr3t" not in str(e.value)
