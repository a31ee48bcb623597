"""Unix-socket listeners shared by vaultd, serve's update hand-off and the vLLM weight hand-off: who is
on the other end (the kernel's word, SO_PEERCRED), and an accept loop that outlives a moment without
descriptors."""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading

log = logging.getLogger("codemoat")

UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EINTR}


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected, as the kernel recorded it (SO_PEERCRED)."""
    return UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))


def accept(sock: socket.socket, stop: threading.Event, who: str) -> socket.socket | None:
    """The next connection on a unix listener, or None once `sock` is closed or `stop` set. Out of
    descriptors or memory for now (many connections at once) is waited out: they come back when those
    close, and giving up would stop the listener accepting anyone, for good."""
    while not stop.is_set():
        try:
            return sock.accept()[0]
        except OSError as e:
            if stop.is_set() or e.errno not in _TRANSIENT:
                return None  # closed
            log.warning("%s: cannot accept a connection now (%s); trying again", who, e.strerror or e)
            stop.wait(0.1)
    return None


def close_listener(sock: socket.socket) -> None:
    """Close a listener whose `accept` loop may be blocked in another thread. close() alone does not wake it
    (Linux): the thread, and all its loop holds, stayed blocked for good; shutdown() ends its accept (EINVAL)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
