"""Review of vaultd's answer to a message it cannot take (too long, or carrying descriptors) before it closes.

The answer was sent, then the connection closed at once: a caller that had sent anything after that message (a
pipelined request) had its connection reset by the close, unread data in vaultd's queue, and read "connection reset"
in place of the reason, the bare hang-up the answer was there to end. And the answer was a blocking send: a caller
that never reads held its connection's thread. Now it is answered as a refused connection is, without waiting:
the answer, then what it sent after read and dropped, then the close.
"""

from __future__ import annotations

import json
import os
import socket

import pytest

from codemoat.engines.memfd import MemfdBuffer
from codemoat.vault.client import VaultClient
from codemoat.vault.daemon import Offer, VaultDaemon
from codemoat.vault.wire import MAX_MESSAGE

REQUEST = b'{"op": "get", "model": "acme-coder"}'


@pytest.fixture
def daemon(tmp_path):
    buf = MemfdBuffer.from_bytes(b"GGUF" + bytes(4092), name="test-model")
    d = VaultDaemon(tmp_path / "vault.sock", allow_uids={os.getuid()}).start()
    d.offer(Offer("acme-coder", buf.fd, buf.size, {}))
    yield d
    d.close()
    buf.close()


def _send_bad(s: socket.socket, sent: str) -> None:
    if sent == "descriptors":
        fd = os.open(os.devnull, os.O_RDONLY)
        try:
            socket.send_fds(s, [REQUEST], [fd])
        finally:
            os.close(fd)
    else:
        s.send(REQUEST + b" " * MAX_MESSAGE)


@pytest.mark.parametrize("sent", ["descriptors", "too long"])
def test_the_reason_reaches_a_caller_that_sent_more_after_the_refused_message(daemon, sent):
    """A request right behind the refused one (sent before vaultd read either): the caller still reads the reason,
    then the end of the connection, never a reset."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(daemon.path)
    s.settimeout(10)
    _send_bad(s, sent)
    try:
        s.send(REQUEST)
    except OSError:  # vaultd had already answered and closed: the reason is still there to read
        pass
    answer = json.loads(s.recv(65536))
    assert answer["ok"] is False
    assert ("file descriptors" if sent == "descriptors" else "too long") in answer["error"], answer
    assert s.recv(65536) == b""
    s.close()


def test_a_caller_that_sends_a_good_request_is_answered_and_kept(daemon):
    """The negative: a request vaultd can take is answered with the model, and the connection stays open."""
    c = VaultClient.connect(daemon.path)
    os.close(c.fetch("acme-coder").fd)
    os.close(c.fetch("acme-coder").fd)
    c.close()
