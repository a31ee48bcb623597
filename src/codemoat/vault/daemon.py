"""The vault daemon's protocol: hand a decrypted model to an allowed local process as a sealed memfd.

    daemon = VaultDaemon("/run/codemoat/vault.sock", allow_uids={998}).start()
    daemon.offer(Offer("acme-coder", fd, size, facts))       # a sealed memfd, decrypted once
    ...
    got = VaultClient.connect("/run/codemoat/vault.sock").fetch("acme-coder")   # in `serve`: vault.client

Privilege separation in the manner of OpenSSH's privsep monitor and ssh-agent: only the daemon's
account reads the machine key, the license and the container; a worker gets the plaintext it
needs and nothing that decrypts it again. The transport is an `AF_UNIX` `SOCK_SEQPACKET` socket
(mode 0660, the group the admin chooses): one JSON object per message, the memfd attached as
`SCM_RIGHTS` (unix(7); vault.wire). Who may ask is decided twice by the kernel's word, never the caller's:
`SO_PEERCRED` at connect time, and `SCM_CREDENTIALS` on every request (`SO_PASSCRED`), so a
connected socket handed to a process of another uid cannot replay a request. The daemon's
answers carry the model id, the size and manifest facts, and, when the license watermarks outputs,
the customer's watermark key (what serve needs to mark completions; it decrypts nothing), never the
content key or the machine key. On the kept connection the daemon later sends `{"op": "revoke"}`
(serve unloads and answers 503), `{"op": "available"}`, or `{"op": "update", "channel": "adapter:NAME"}`
(`update apply` installed a new version in vaultd's home: serve swaps it in, fetching it as before;
for `"channel": "model"` vaultd has first offered the new version under the same model id).
"""

from __future__ import annotations

import base64
import grp
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

from ..errors import CodemoatError
from ..unixsock import accept, close_listener, peer_cred
from .wire import MAX_MESSAGE, VaultdError, recv_msg, send_msg

log = logging.getLogger("codemoat.vault")

REFUSED_DRAIN_S = 2.0  # how long a refused caller's unread requests are read before its connection closes
MAX_CONNS_PER_UID = 32  # connections (each a thread) one uid may hold at once; past it refused in one line
MAX_CONNS = 128  # and all uids together (a serve holds one; `update apply` and the CLI one each, briefly)


@dataclass
class Offer:
    """A model the daemon hands out: its sealed memfd (the daemon's own copy) and public facts."""

    model_id: str
    fd: int
    size: int
    facts: dict[str, Any] = field(default_factory=dict)
    #: the license's (or lease's) watermark key as it is now; None: outputs are not watermarked
    watermark_key: Callable[[], bytes | None] | None = None


class VaultDaemon:
    """Listens on `path`; gives an offered model's memfd to callers whose uid (or group) is allowed."""

    def __init__(
        self,
        path: str | Path,
        *,
        allow_uids: set[int] | None = None,
        allow_groups: set[int] | None = None,
        group: int | None = None,
        resolve: Callable[[str], Offer | None] | None = None,
        per_model: dict[str, tuple[set[int], set[int]]] | None = None,
        max_conns_per_uid: int = MAX_CONNS_PER_UID,
        max_conns: int = MAX_CONNS,
    ):
        self.path = str(path)
        #: asked for an id nothing was offered under (vaultd: `update:NAME`, an installed vendor
        #: adapter, opened at the first request and again when a newer version is installed); the
        #: Offer it returns holds a descriptor of its own (a dup), which the daemon closes once sent
        self.resolve = resolve
        self.allow_uids, self.allow_groups = set(allow_uids or ()), set(allow_groups or ())
        #: model id → (uids, gids) that may fetch that model besides the lists above, which may fetch
        #: every model (`vaultd --allow-uid MODEL_ID=USER`: one vaultd, two teams' models, two serves)
        self.per_model = {m: (set(u), set(g)) for m, (u, g) in (per_model or {}).items()}
        self.group = group
        self._offers: dict[str, Offer] = {}
        self._gone: dict[str, str] = {}  # model id → why it is not available now
        self._conns: dict[socket.socket, tuple[int, int]] = {}  # kept connections → their (uid, gid)
        self.max_conns_per_uid, self.max_conns = max_conns_per_uid, max_conns
        self._held: dict[int, int] = {}  # uid → connections (threads) it holds now, refused callers' included
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._stop = threading.Event()

    # -- who may ask ------------------------------------------------------------------------------
    def allowed(self, uid: int, gid: int) -> bool:
        """May connect at all: on the lists for every model, or on some model's own."""
        lists = [(self.allow_uids, self.allow_groups), *self.per_model.values()]
        return any(_member(uid, gid, uids, gids) for uids, gids in lists)

    def may_fetch(self, model_id: str, uid: int, gid: int) -> bool:
        """May get `model_id`: on the lists for every model, or on that model's own."""
        own = self.per_model.get(model_id)
        return _member(uid, gid, self.allow_uids, self.allow_groups) or (own is not None and _member(uid, gid, *own))

    # -- what is offered --------------------------------------------------------------------------
    def offer(self, offer: Offer) -> None:
        with self._lock:
            self._offers[offer.model_id] = offer
            self._gone.pop(offer.model_id, None)
        self._broadcast({"op": "available", "model": offer.model_id}, offer.model_id)

    def revoke(self, model_id: str, reason: str) -> None:
        """Stop handing `model_id` out and tell every connected client to unload it now."""
        with self._lock:
            self._offers.pop(model_id, None)
            self._gone[model_id] = reason
        log.info("vaultd: %s withdrawn: %s", model_id, reason)
        self._broadcast({"op": "revoke", "model": model_id, "reason": reason}, model_id)

    def announce(self, msg: dict[str, Any]) -> int:
        """Send `msg` (an `update` notice) to every connected client, or, when it names a `model`, to the
        clients that may fetch that model, and a vendor adapter's (channel `adapter:NAME`) to those that
        may fetch it (`update:NAME`): another team's serve never learns its name; returns how many it reached."""
        model, channel = msg.get("model"), str(msg.get("channel") or "")
        if not isinstance(model, str) and channel.startswith("adapter:"):
            model = "update:" + channel[len("adapter:") :]  # the id a serve fetches it by (engines.adapters)
        return self._broadcast(msg, model if isinstance(model, str) else None)

    def _broadcast(self, msg: dict[str, Any], model_id: str | None = None) -> int:
        """Never waits on a client: one whose socket is full (it stopped reading, or asks and never reads
        the answers) would hold every later revocation back from the clients after it; it is cut off.
        News of `model_id` goes only to the clients that may fetch it."""
        data = json.dumps(msg).encode()
        with self._lock:
            held = list(self._conns.items())
        conns = [c for c, (uid, gid) in held if model_id is None or self.may_fetch(model_id, uid, gid)]
        sent = 0
        for c in conns:
            try:
                c.send(data, socket.MSG_DONTWAIT)
                sent += 1
            except BlockingIOError:
                log.warning("vaultd: a client does not read its messages; disconnected it")
                try:
                    c.shutdown(socket.SHUT_RDWR)  # its thread, maybe blocked answering it, ends and closes it
                except OSError:
                    pass
            except OSError:
                pass
        return sent

    # -- the socket -------------------------------------------------------------------------------
    def start(self) -> VaultDaemon:
        p = Path(self.path)
        if p.is_socket():
            p.unlink()
        elif p.exists():
            raise VaultdError(f"{p} exists and is not a socket")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # on the listener, so that even a request sent before accept() carries its sender's credentials
        s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        old = os.umask(0o177)  # never world-connectable, not even for an instant
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        if self.group is not None:
            try:
                os.chown(self.path, -1, self.group)
            except PermissionError:
                s.close()
                os.unlink(self.path)
                raise VaultdError(
                    f"cannot give {self.path} to group {self.group}: vaultd's account must be a member of it"
                ) from None
        os.chmod(self.path, 0o660)
        s.listen(16)
        self._sock = s
        threading.Thread(target=self._accept_loop, name="vaultd-accept", daemon=True).start()
        return self

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while (conn := accept(self._sock, self._stop, "vaultd")) is not None:
            try:
                uid = peer_cred(conn)[1]
            except OSError:
                conn.close()
                continue
            with self._lock:
                mine, total = self._held.get(uid, 0), sum(self._held.values())
                if mine < self.max_conns_per_uid and total < self.max_conns:
                    self._held[uid] = mine + 1
            if mine >= self.max_conns_per_uid or total >= self.max_conns:
                why = (
                    f"uid {uid} holds {mine} connections to the vault daemon already (at most {self.max_conns_per_uid})"
                    if mine >= self.max_conns_per_uid
                    else f"the vault daemon holds {total} connections already (at most {self.max_conns})"
                )
                log.warning("vaultd: refused a connection: %s", why)
                _refuse_now(conn, why + ": close one and retry")
                continue
            try:
                threading.Thread(target=self._serve_counted, args=(conn, uid), name="vaultd-conn", daemon=True).start()
            except RuntimeError:  # no thread to be had: refuse this one, keep accepting
                log.warning("vaultd: cannot start a thread for a new connection; closed it")
                self._release(uid)
                conn.close()

    def _release(self, uid: int) -> None:
        with self._lock:
            if (n := self._held.get(uid, 0) - 1) > 0:
                self._held[uid] = n
            else:
                self._held.pop(uid, None)

    def _serve_counted(self, conn: socket.socket, uid: int) -> None:
        try:
            self._serve_conn(conn)
        finally:
            self._release(uid)

    def _serve_conn(self, conn: socket.socket) -> None:
        pid, uid, gid = peer_cred(conn)
        if not self.allowed(uid, gid):
            log.warning("vaultd: refused pid %d uid %d gid %d (not on the allow-list)", pid, uid, gid)
            try:
                send_msg(conn, {"ok": False, "error": f"uid {uid} is not allowed to use the vault daemon"})
                # read what the caller sent before closing: closing on unread data resets the
                # connection, and the caller would see "reset by peer" instead of the reason
                conn.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + REFUSED_DRAIN_S  # in all: talking on does not keep the thread
                while (left := deadline - time.monotonic()) > 0:
                    conn.settimeout(left)
                    if not conn.recv(MAX_MESSAGE):
                        break
            except OSError:
                pass
            finally:
                conn.close()
            return
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        with self._lock:
            self._conns[conn] = (uid, gid)
        try:
            while not self._stop.is_set():
                msg, fds, cred = recv_msg(conn)
                for fd in fds:  # clients send no descriptors
                    os.close(fd)
                if msg is None:
                    return
                if cred is None or cred[1] != uid or not self.allowed(cred[1], cred[2]):
                    who = "unknown" if cred is None else f"uid {cred[1]}"
                    log.warning("vaultd: refused a request from %s on a connection of uid %d", who, uid)
                    send_msg(conn, {"ok": False, "error": f"request from {who} on a connection of uid {uid}: refused"})
                    continue
                self._answer(conn, msg, cred)
        except VaultdError as e:  # a message too long, or carrying descriptors: the caller is told why it is cut off
            log.warning("vaultd: closed a connection of uid %d: %s", uid, e)
            # as a refused connection: never waiting on a caller that does not read, and reading what it sent
            # after (a close on unread requests resets the connection, and the caller never sees the reason)
            _refuse_now(conn, str(e))
            return
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()

    def _answer(self, conn: socket.socket, msg: dict[str, Any], cred: tuple[int, int, int]) -> None:
        if msg.get("op") != "get" or not isinstance(msg.get("model"), str):
            send_msg(conn, {"ok": False, "error": 'unknown request (expected {"op": "get", "model": ID})'})
            return
        mid = msg["model"]
        if not self.may_fetch(mid, cred[1], cred[2]):
            log.warning("vaultd: refused %r to pid %d uid %d (not on its allow-list)", mid, cred[0], cred[1])
            send_msg(conn, {"ok": False, "error": f"uid {cred[1]} is not allowed to fetch model {mid!r}"})
            return
        with self._lock:
            offer, gone = self._offers.get(mid), self._gone.get(mid)
            known = sorted(self._offers)
            # this answer's own descriptor, taken while the offer is current: its owner revokes it (under
            # this lock) and then closes the offer's fd, whose number the next open() anywhere reuses
            fd = os.dup(offer.fd) if offer is not None else -1
        try:
            if offer is None and gone is None and self.resolve is not None:
                try:
                    offer = self.resolve(mid)  # its fd is a copy of its own, closed here once sent
                except CodemoatError as e:
                    send_msg(conn, {"ok": False, "error": f"{mid!r} is not available: {e}"})
                    return
                fd = offer.fd if offer is not None else -1
            if offer is None:
                why = gone or f"no such model (offered: {', '.join(known) or 'none'})"
                send_msg(conn, {"ok": False, "error": f"model {mid!r} is not available: {why}"})
                return
            log.info("vaultd: handed %s to pid %d uid %d", mid, cred[0], cred[1])
            answer: dict[str, Any] = {"ok": True, "model": mid, "size": offer.size, "facts": offer.facts}
            wm = offer.watermark_key() if offer.watermark_key is not None else None
            if wm:
                answer["watermark_key"] = base64.b64encode(wm).decode()
            send_msg(conn, answer, [fd])
        finally:
            if fd >= 0:
                os.close(fd)

    def withdraw_all(self, reason: str) -> None:
        """Hand nothing out any more and tell no one (vaultd stopping under an offline license: its serves
        keep what they hold), before the offers' descriptors are closed."""
        with self._lock:
            self._gone.update(dict.fromkeys(self._offers, reason))
            self._offers.clear()
            self.resolve = None

    def close(self) -> None:
        self._stop.set()
        if self._sock is not None:
            close_listener(self._sock)  # its accept thread ends (it held the daemon and its offers)
            self._sock = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
        with self._lock:
            conns, self._conns = list(self._conns), {}
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _refuse_now(conn: socket.socket, why: str) -> None:
    """Answer `why` in one line and close, on the accept loop's own thread: nothing here waits (the
    requests already sent are read first, so that the caller gets the reason rather than a reset)."""
    try:
        conn.setblocking(False)
        send_msg(conn, {"ok": False, "error": why})
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(MAX_MESSAGE):
            pass
    except OSError:
        pass
    finally:
        conn.close()


def _member(uid: int, gid: int, uids: set[int], gids: set[int]) -> bool:
    """uid on the list, or primary group (or a supplementary group of uid's account) on it."""
    if uid in uids or gid in gids:
        return True
    if gids:
        try:
            import pwd

            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            return False
        return any(name in grp.getgrgid(g).gr_mem for g in gids if _group_exists(g))
    return False


def _group_exists(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
    except KeyError:
        return False
    return True
