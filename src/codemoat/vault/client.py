"""serve's side of the vault daemon: one kept connection to `codemoat vaultd`; `fetch` a model's sealed
memfd, then `watch` the connection for revocations, availability and update notices.

    client = VaultClient.connect("unix:/run/codemoat/vault.sock")
    got = client.fetch("acme-coder")       # got.fd (this process owns it), got.size, got.facts
    client.watch(on_message, on_lost)

The client trusts the listener only if it runs as root, this account, or the owner of the socket's
folder (vaultd's own RuntimeDirectory): never another user who bound the path first.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..unixsock import peer_cred
from .wire import MAX_MESSAGE, VaultdError, recv_msg, send_msg, socket_path

log = logging.getLogger("codemoat.vault")

FETCH_TIMEOUT_S = 120.0  # a fetch waits this long for its answer (a stopped or stuck vaultd must not hold serve's start)


@dataclass
class Received:
    """What a client got: a file descriptor it now owns, the daemon's header, and the watermark key."""

    model_id: str
    fd: int
    size: int
    facts: dict[str, Any]
    watermark_key: bytes | None = field(default=None, repr=False)


def _recv_now(sock: socket.socket) -> dict[str, Any] | None:
    """A message already waiting on `sock` (a refusal vaultd sent before it closed), else None. A close that left
    our request unread makes the socket's next call fail with ECONNRESET once (the error is then cleared), ahead of
    the refusal still queued: read once more past it."""
    for _ in range(2):
        try:
            msg = json.loads(sock.recv(MAX_MESSAGE, socket.MSG_DONTWAIT) or b"null")
        except ConnectionResetError:
            continue
        except (OSError, ValueError):
            return None
        return msg if isinstance(msg, dict) else None
    return None


def _readable(sock: socket.socket, seconds: float) -> bool:
    """Whether a message (or the end) is waiting on `sock` within `seconds`."""
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN)
    return bool(p.poll(max(0, int(seconds * 1000))))


class VaultClient:
    """serve's side: one kept connection; `fetch` a model, then `watch` for revocations."""

    def __init__(self, sock: socket.socket, path: str):
        self.sock, self.path = sock, path
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False  # closed by its owner: the watcher ends without reporting a lost daemon
        #: once `watch` reads the socket, it hands the answers to `fetch` through here
        self._answers: queue.Queue[tuple[dict[str, Any] | None, list[int]]] = queue.Queue()
        #: answers still due to fetches that gave up waiting: vaultd answers in order, so the next ones
        #: to arrive are theirs, not a later fetch's
        self._stale = 0

    @classmethod
    def connect(cls, spec: str) -> VaultClient:
        path = socket_path(spec)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            raise VaultdError(f"cannot reach the vault daemon at {path}: {e.strerror or e}") from None
        # the listener must be root, this account, or the owner of the socket's folder (vaultd's own
        # RuntimeDirectory): not another user who bound the path first in a folder anyone may write
        _, uid, _ = peer_cred(s)
        try:
            owner = os.stat(os.path.dirname(os.path.abspath(path))).st_uid
        except OSError:
            owner = -1
        if uid not in (0, os.getuid(), owner):
            s.close()
            raise VaultdError(
                f"the process listening on {path} runs as uid {uid}, which owns neither the socket's folder nor "
                "this server: not trusted as the vault daemon"
            )
        return cls(s, path)

    def fetch(self, model_id: str) -> Received:
        """The model's memfd (this process owns the fd), or `VaultdError` with the daemon's reason."""
        with self._lock:
            try:
                try:
                    send_msg(self.sock, {"op": "get", "model": model_id})
                except OSError:  # vaultd answered at once and closed (too many connections): say why
                    refusal = _recv_now(self.sock)
                    if refusal is None:
                        raise
                    raise VaultdError(f"vault daemon: {refusal.get('error', 'refused')}") from None
                # the watcher reads the socket and passes answers on, unless this is the watcher itself
                # (an `available` announcement reloads the model from inside it)
                relay = self._thread is not None and threading.current_thread() is not self._thread
                while relay:
                    try:
                        msg, fds = self._answers.get(timeout=FETCH_TIMEOUT_S)
                    except queue.Empty:
                        self._stale += 1  # its answer, when it comes, is nobody's
                        raise VaultdError(f"the vault daemon at {self.path} did not answer") from None
                    if msg is None:
                        self._answers.put((None, []))  # for the next fetch too
                        raise VaultdError(f"the vault daemon at {self.path} closed the connection")
                    if not self._drop_stale(fds):
                        break
                deadline = time.monotonic() + FETCH_TIMEOUT_S
                while not relay:
                    if not _readable(self.sock, deadline - time.monotonic()):
                        self._stale += 1  # its answer, when it comes, is nobody's
                        raise VaultdError(f"the vault daemon at {self.path} did not answer")
                    msg, fds, _ = recv_msg(self.sock, max_fds=1)
                    if msg is None:
                        raise VaultdError(f"the vault daemon at {self.path} closed the connection")
                    if "ok" in msg:
                        if not self._drop_stale(fds):
                            break
                        continue
                    for fd in fds:
                        os.close(fd)
                    # an announcement that crossed our request: the watcher is not running yet
            except OSError as e:
                # vaultd refused at once and closed before reading our request: Linux then fails our read with
                # ECONNRESET first (and clears it), with the refusal still queued behind: say why, not "reset"
                refusal = _recv_now(self.sock) if isinstance(e, ConnectionResetError) else None
                if refusal is not None and refusal.get("ok") is False:
                    raise VaultdError(f"vault daemon: {refusal.get('error', 'refused')}") from None
                raise VaultdError(f"vault daemon at {self.path}: {e.strerror or e}") from None
        if not msg.get("ok"):
            for fd in fds:
                os.close(fd)
            raise VaultdError(f"vault daemon: {msg.get('error', 'refused')}")
        if len(fds) != 1 or not isinstance(msg.get("size"), int):
            for fd in fds:
                os.close(fd)
            raise VaultdError("vault daemon: answer without a model file")
        wm = msg.get("watermark_key")
        try:
            key = base64.b64decode(wm, validate=True) if isinstance(wm, str) else None
        except (binascii.Error, ValueError):
            key = None
        if wm is not None and (key is None or len(key) != 32):
            os.close(fds[0])
            raise VaultdError("vault daemon: the watermark key in its answer is malformed")
        return Received(str(msg.get("model")), fds[0], msg["size"], dict(msg.get("facts") or {}), key)

    def _drop_stale(self, fds: list[int]) -> bool:
        """True (its descriptors closed) when an answer is the late one of a fetch that gave up."""
        if not self._stale:
            return False
        self._stale -= 1
        for fd in fds:
            os.close(fd)
        return True

    def watch(self, on_message: Callable[[dict[str, Any]], None], on_lost: Callable[[str], None]) -> None:
        """A daemon thread: every announcement (revoke, available) to `on_message`; EOF to `on_lost`."""

        def run() -> None:
            while True:
                try:
                    msg, fds, _ = recv_msg(self.sock, max_fds=1)
                except (OSError, VaultdError) as e:
                    self._answers.put((None, []))
                    if not self._closed:
                        on_lost(str(e))
                    return
                if msg is not None and "ok" in msg:  # the answer to a `fetch` (a reload, an adapter)
                    self._answers.put((msg, fds))
                    continue
                for fd in fds:
                    os.close(fd)
                if msg is None:
                    self._answers.put((None, []))
                    if not self._closed:
                        on_lost(f"the vault daemon at {self.path} closed the connection")
                    return
                try:
                    on_message(msg)
                except Exception:
                    log.exception("handling the vault daemon's %s", msg.get("op"))

        self._thread = threading.Thread(target=run, name="vault-client", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
