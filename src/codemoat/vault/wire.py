"""The vault daemon's wire format, shared by `vault.daemon` (vaultd) and `vault.client` (serve).

An `AF_UNIX` `SOCK_SEQPACKET` socket carries one JSON object per message; a model's memfd travels
as `SCM_RIGHTS`, and the sender's kernel credentials as `SCM_CREDENTIALS` when the receiver set
`SO_PASSCRED` (unix(7)).
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

from ..errors import CodemoatError
from ..unixsock import UCRED

MAX_MESSAGE = 64 * 1024


class VaultdError(CodemoatError):
    """The vault daemon refused or could not be reached (one line)."""


def socket_path(spec: str) -> str:
    """`unix:/run/codemoat/vault.sock` or a bare path → the path."""
    path = spec[5:] if spec.startswith("unix:") else spec
    if not path or spec.startswith(("tcp:", "http:", "https:")):
        raise VaultdError(f"vault socket {spec!r}: give unix:PATH")
    return path


def send_msg(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def recv_msg(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any] | None, list[int], tuple[int, int, int] | None]:
    """One message: (JSON or None at EOF, received fds, the sender's (pid, uid, gid) when passed)."""
    anc = socket.CMSG_SPACE(UCRED.size) + (socket.CMSG_SPACE(max_fds * 4) if max_fds else 0)
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, anc, getattr(socket, "MSG_CMSG_CLOEXEC", 0))
    fds: list[int] = []
    cred = None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += list(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) - len(payload) % 4]))
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            cred = UCRED.unpack(payload[: UCRED.size])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, [], cred
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        if flags & socket.MSG_TRUNC:
            raise VaultdError("vault daemon message too long")
        raise VaultdError("vault daemon message carried more file descriptors than it may")  # the rest the kernel closed
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError):  # deep nesting: an unknown request, not a dead connection thread
        msg = {"op": "?"}
    return (msg if isinstance(msg, dict) else {"op": "?"}), fds, cred
