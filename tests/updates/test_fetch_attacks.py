"""A hostile update channel (or whoever sits on its path: plain http is allowed) against the customer's
`codemoat update fetch`. The channel is not trusted: what it delivers is checked by `update verify/apply`
like a file off a USB stick. What it must not do either is exhaust the customer's machine before then:
the inbox is in codemoat's home, beside the database and the audit log, and the audit log stops the
server (fail closed) once under 16 MiB are free beside it."""

from __future__ import annotations

import shutil
import threading
from http.server import BaseHTTPRequestHandler

import pytest
from localhttp import LocalHTTP

from codemoat.errors import CodemoatError
from codemoat.updates import channel as ch

MB = 1 << 20


def hostile_channel(index_body, bundle_bytes: int = MB):
    """A channel answering /index.json with `index_body` (bytes, or a callable writing it to the socket) and any
    other path with `bundle_bytes` zeros; it records the paths asked for and the index bytes it got sent."""
    seen: dict = {"paths": [], "index_sent": 0}
    lock = threading.Lock()

    class Channel(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            with lock:
                seen["paths"].append(self.path)
            self.send_response(200)
            self.end_headers()  # HTTP/1.0, no length: the body ends when the connection does
            try:
                if self.path == "/index.json":
                    for piece in index_body():
                        self.wfile.write(piece)
                        with lock:
                            seen["index_sent"] += len(piece)
                else:
                    self.wfile.write(b"\0" * bundle_bytes)
            except OSError:  # the client hung up: what an attacker's server sees once it is refused
                pass

    return Channel, seen


def test_an_index_larger_than_any_real_one_is_refused_before_it_is_all_read(home):
    """Was broken: the index was read whole into memory (httpx's .get()), and the deadline only abandoned that read
    in its thread, which went on reading: a channel answering with an endless index grew `update fetch` (on the
    serving host) until the kernel's OOM killer picked a process, perhaps the server. Here 256 MiB of JSON white
    space then [] (a valid, empty index): fetch read all of it and said 'no new bundles'. Now the index is read
    up to ch.MAX_INDEX and refused past it in one line."""

    def body():
        for _ in range(256):
            yield b" " * MB
        yield b"[]"

    handler, seen = hostile_channel(body)
    with LocalHTTP(handler) as srv:
        with pytest.raises(CodemoatError) as e:
            ch.fetch(srv.url, home / "updates" / "inbox")
    assert "index is larger than" in str(e.value) and "\n" not in str(e.value), e.value
    assert seen["index_sent"] < ch.MAX_INDEX + 48 * MB, seen["index_sent"]  # the limit and what sockets buffer


def test_an_index_of_a_plausible_size_is_still_read(home):
    """The negative of the test above: an index of a few thousand entries (about 0.5 MiB) with nothing new to fetch
    is read and parsed as before, past white space that comes to under the limit."""
    import hashlib
    import json

    inbox = home / "updates" / "inbox"
    inbox.mkdir(parents=True)
    data = b"bundle"
    for name in ("a.moatpkg", "b.moatpkg"):  # already fetched: the index names them again and again
        (inbox / name).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    entries = [{"file": "ab"[i % 2] + ".moatpkg", "size": len(data), "sha256": digest} for i in range(5000)]
    body = json.dumps(entries).encode() + b" " * MB
    assert len(body) < ch.MAX_INDEX
    handler, seen = hostile_channel(lambda: [body])
    with LocalHTTP(handler) as srv:
        assert ch.fetch(srv.url, inbox) == []
    assert seen["paths"] == ["/index.json"]


def test_an_index_of_millions_of_tiny_values_is_refused_before_it_is_decoded(home):
    """Was broken: an index under the size limit was decoded whole before its first entry was looked at, and
    Python's json builds an object per value: 16 MiB of `{},` (5.6 million empty objects) peaked `update fetch`
    at 445 MB before 'malformed entry'. Now its JSON values are counted first (commas plus opening brackets,
    nothing built) and more than ch.MAX_INDEX_VALUES are refused in one line."""
    n = (ch.MAX_INDEX - 2) // 3
    body = b"[" + b"{}," * (n - 1) + b"{}]"
    assert len(body) <= ch.MAX_INDEX
    handler, seen = hostile_channel(lambda: [body])
    with LocalHTTP(handler) as srv:
        with pytest.raises(CodemoatError) as e:
            ch.fetch(srv.url, home / "updates" / "inbox")
    assert "index holds more than 1,000,000 JSON values: not decoded" in str(e.value) and "\n" not in str(e.value)
    assert seen["paths"] == ["/index.json"]


def test_the_densest_real_index_under_the_size_limit_is_within_the_value_count():
    """The negative: entries as the vendor's channel writes them (file, size, sha256), with the shortest names
    there are, filling the whole 16 MiB: fewer values than the count refuses, so no index of real entries that
    the size limit lets through is refused by it."""
    import json

    one = {"file": "a.moatpkg", "size": 1, "sha256": "0" * 64}
    n = ch.MAX_INDEX // (len(json.dumps(one)) + 2)
    body = json.dumps([one] * n).encode()
    assert len(body) <= ch.MAX_INDEX
    assert body.count(b",") + body.count(b"{") + body.count(b"[") <= ch.MAX_INDEX_VALUES


def test_an_index_promising_more_than_the_disk_holds_downloads_nothing(home):
    """Was broken: the index's sizes were believed one bundle at a time (each up to 64 GiB) and downloaded into the
    inbox until the disk was full: a channel listing enough new names filled the file system that holds the
    database and the audit log, and the server then refused every request (the audit log fails closed under
    16 MiB free). Here the bundles the index names come to more than the inbox's file system has free: before,
    fetch asked for the first one; now nothing is asked for and the refusal names the space needed and free."""
    inbox = home / "updates" / "inbox"
    inbox.mkdir(parents=True)
    n = shutil.disk_usage(inbox).free // ch.MAX_BUNDLE + 2
    index = [{"file": f"flood-{i}.moatpkg", "size": ch.MAX_BUNDLE, "sha256": "0" * 64} for i in range(n)]
    import json

    handler, seen = hostile_channel(lambda: [json.dumps(index).encode()])
    with LocalHTTP(handler) as srv:
        with pytest.raises(CodemoatError) as e:
            ch.fetch(srv.url, inbox)
    msg = str(e.value)
    assert "free" in msg and "GiB" in msg and str(inbox) in msg and "\n" not in msg, msg
    assert seen["paths"] == ["/index.json"], seen["paths"][:3]
    assert list(inbox.iterdir()) == []


def _rchar() -> int:
    """Bytes this thread has read through read(2) and friends so far (/proc/thread-self/io: fetch hashes the
    inbox's copy in the calling thread; the process's count would take in other threads' reads, such as a
    server left running by an earlier test of the same session)."""
    with open("/proc/thread-self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_a_bundle_named_again_and_again_is_hashed_once(home):
    """Was broken: each index entry had its inbox copy hashed whole to see whether it was already there, once per
    entry: an index naming a bundle the inbox holds (models are tens of GiB) a hundred thousand times kept the
    serving host's disk and a core busy for hours. Here a 32 MiB inbox bundle named 40 times: before, 40 x 32 MiB
    read; now a name counts once. Nothing is downloaded either way (the negative: it is held)."""
    import hashlib
    import json

    inbox = home / "updates" / "inbox"
    inbox.mkdir(parents=True)
    data = b"\x01" * (32 * MB)
    (inbox / "model.moatpkg").write_bytes(data)
    entry = {"file": "model.moatpkg", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    handler, seen = hostile_channel(lambda: [json.dumps([entry] * 40).encode()])
    with LocalHTTP(handler) as srv:
        before = _rchar()
        assert ch.fetch(srv.url, inbox) == []
        read = _rchar() - before
    assert read < 3 * 32 * MB, read // MB
    assert seen["paths"] == ["/index.json"]
