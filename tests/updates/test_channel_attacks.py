"""An outside attacker's review of the vendor's update channel (`codemoat vendor channel`): anyone who can reach it.

Was broken: every GET /index.json read every published bundle whole to hash it (0.9 s a GiB; eight requests
at once 8 s of the server's CPU), so anyone could keep the vendor's channel busy with a loop of index
requests; and a connection left silent held a server thread for good. Now each bundle is hashed once (again
when its file changes) and a connection idle past the timeout is closed.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import urllib.request

import pytest

from codemoat.updates.channel import make_server

HANG = 60
MB = 1 << 20


def _rchar() -> int:
    """Bytes this process has read through read(2) and friends so far (/proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.fixture
def channel(tmp_path):
    pub = tmp_path / "published"
    pub.mkdir()
    srv = make_server(pub, "127.0.0.1", 0, timeout_s=1)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.folder = pub
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _index(url: str) -> dict[str, str]:
    with urllib.request.urlopen(url + "/index.json", timeout=HANG) as r:
        return {e["file"]: e["sha256"] for e in json.load(r)}


def test_the_index_reads_each_bundle_once_and_follows_changes(channel):
    big = os.urandom(32 * MB)
    (channel.folder / "acme-model-2.moatpkg").write_bytes(big)
    assert _index(channel.url) == {"acme-model-2.moatpkg": hashlib.sha256(big).hexdigest()}
    before = _rchar()
    for _ in range(10):
        _index(channel.url)
    assert _rchar() - before < 32 * MB, "ten more index requests read the 32 MiB bundle again"
    # the negatives: a bundle replaced (a new file in its place), added or removed is what the index says
    other = os.urandom(32 * MB)
    (channel.folder / "new.tmp").write_bytes(other)
    os.replace(channel.folder / "new.tmp", channel.folder / "acme-model-2.moatpkg")
    (channel.folder / "acme-model-3.moatpkg").write_bytes(b"three")
    assert _index(channel.url) == {
        "acme-model-2.moatpkg": hashlib.sha256(other).hexdigest(),
        "acme-model-3.moatpkg": hashlib.sha256(b"three").hexdigest(),
    }
    with open(channel.folder / "acme-model-3.moatpkg", "ab") as f:  # appended to in place: read again
        f.write(b"+")
    os.unlink(channel.folder / "acme-model-2.moatpkg")
    assert _index(channel.url) == {"acme-model-3.moatpkg": hashlib.sha256(b"three+").hexdigest()}


@pytest.mark.parametrize("sent", [b"", b"GET /index.json HTTP/1.1\r\nHost: c\r\n", b"GET /index"])
def test_a_connection_that_sends_nothing_more_is_closed(channel, sent):
    with socket.create_connection(("127.0.0.1", channel.server_address[1]), timeout=HANG) as s:
        s.sendall(sent)
        try:
            data = s.recv(4096)
        except TimeoutError:
            pytest.fail(f"the channel still held a silent connection after {HANG} s")
        except ConnectionResetError:
            data = b""
    assert b"200 OK" not in data
    assert _index(channel.url) == {}  # and it answers on


def test_a_bundle_rewritten_in_place_with_its_time_put_back_is_hashed_again(channel):
    """Was: the digest was kept by name, device, inode, size and mtime, and all five stay the same for a bundle
    rewritten in place at its size whose time is put back (`cp -p` over it, `touch -d`, `rsync --inplace -t`):
    the index went on naming the old digest, so every customer's fetch of it failed ('does not match its index
    entry') until the channel restarted. Now the inode's change time (ctime, which no one can set) is in the key too.
    The negative (the key still saves the read) is the test above."""
    p = channel.folder / "acme-model-4.moatpkg"
    p.write_bytes(b"a" * 1000)
    st = p.stat()
    assert _index(channel.url) == {p.name: hashlib.sha256(b"a" * 1000).hexdigest()}
    with open(p, "r+b") as f:  # the same file, the same size, other bytes
        f.write(b"b" * 1000)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = p.stat()
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert _index(channel.url) == {p.name: hashlib.sha256(b"b" * 1000).hexdigest()}


def test_a_request_head_sent_a_byte_at_a_time_is_cut_off(channel, capfd):
    """Was: the 1 s timeout (60 s outside tests) was each recv's, so a request line sent a byte every 0.3 s (every
    59 s outside tests) held a server thread for good, one thread per such connection. Now the whole head is due
    within the timeout. The negative: a head sent whole, after the slow one, is answered (the tests above)."""
    with socket.create_connection(("127.0.0.1", channel.server_address[1]), timeout=HANG) as s:
        line = b"GET /index.json HTTP/1.1\r\nX-Slow: " + b"a" * 1000
        try:
            for i, b in enumerate(line):
                s.sendall(bytes([b]))
                time.sleep(0.3)
                if i * 0.3 > HANG:
                    pytest.fail(f"a head sent a byte every 0.3 s was still read after {HANG} s")
        except OSError:
            pass
    assert _index(channel.url) == {}
    assert "Traceback" not in capfd.readouterr().err  # the cut-off connection is answered, not a stack on stderr
