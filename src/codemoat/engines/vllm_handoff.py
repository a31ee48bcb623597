"""Hand a sealed model's plaintext memfd to vLLM's worker processes, never the content key.

vLLM builds the model in worker processes it spawns itself (EngineCore, then one worker per
tensor-parallel rank), so nothing the server holds reaches them by inheritance. The server
decrypts the container into a sealed memfd (`engines.sealed.decrypt_to_memfd`) and serves that
one file descriptor over a unix socket in a private 0700 folder (`PrivateDir`), by `SCM_RIGHTS`.
The kernel vouches for who asks (`SO_PEERCRED`): only a process of the same uid that descends
from this server gets the descriptor; anyone else gets a refusal and nothing else. So:

- the content key never leaves the server's (non-dumpable) process: no vLLM process, command
  line, environment, log or file ever holds it;
- the plaintext exists only in the memfd (no filesystem path, tmpfs included) and, once loaded,
  in the worker's parameters; the worker makes itself non-dumpable before it maps the memfd.

The folder also holds what vLLM must read from a model folder (config.json, the tokenizer files):
no weights, removed when the engine closes (and at exit). Those files describe the architecture
and the vocabulary, which the served API reveals anyway (tokenisation, `/health`); the weights
are what the container protects.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from ..errors import CodemoatError
from ..unixsock import accept, peer_cred

log = logging.getLogger("codemoat.engines")

MAX_MESSAGE = 1 << 20


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2 :].split()[1])  # the field after the state; comm may hold spaces


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether `pid` is `ancestor` or one of its descendants (walked up /proc's parent links)."""
    for _ in range(64):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        pid = _ppid(pid)
    return False


class PrivateDir:
    """A 0700 folder on tmpfs (/dev/shm when there is one) for vLLM's config and tokenizer files and
    the hand-off socket; removed by `remove()` and, failing that, at exit."""

    def __init__(self, prefix: str = "codemoat-vllm-"):
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))  # mkdtemp: mode 0700, a fresh name
        atexit.register(self.remove)

    def write(self, name: str, data: bytes) -> Path:
        if name.endswith((".safetensors", ".bin", ".pt", ".gguf")) or "/" in name.strip("/") or name in ("", ".", ".."):
            raise CodemoatError(f"{name!r} is not written to the engine's folder: weights stay in memory")
        p = self.path / name
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return p

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def unpack_config(view: Any, parts: dict[str, tuple[int, int]], prefix: str = "codemoat-vllm-") -> PrivateDir:
    """A `PrivateDir` holding a decrypted sealed folder's files other than its weights (config and
    tokenizer files: the ones `vendor seal` packs, `vault.seal_model.model_file`), read from `view`."""
    from ..vault.seal_model import model_file

    private = PrivateDir(prefix)
    try:
        for name, (off, size) in parts.items():
            if model_file(Path(name).name):
                private.write(Path(name).name, bytes(view[off : off + size]))
    except BaseException:
        private.remove()
        raise
    return private


class WeightHandoff:
    """Serve one sealed memfd (`fd`, `size` bytes, its files at `parts`) to this process's descendants,
    on the socket `folder/name`."""

    def __init__(self, folder: Path, fd: int, size: int, parts: dict[str, tuple[int, int]], name: str = "weights.sock"):
        self.path = str(folder / name)
        self._fd, self._size, self._parts = fd, size, {k: list(v) for k, v in parts.items()}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self._sock.listen(16)
        self.served = 0  # descriptors handed out
        self.refused = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="codemoat-vllm-handoff", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        # Out of descriptors for a moment (anyone's HTTP connections) is waited out, as vaultd does.
        while (conn := accept(self._sock, self._closed, "weight hand-off")) is not None:
            with conn:
                try:
                    self._answer(conn)
                except OSError as e:
                    log.warning("weight hand-off to a vLLM worker failed: %s", e)

    def _answer(self, conn: socket.socket) -> None:
        pid, uid, _gid = peer_cred(conn)
        if uid != os.getuid() or not descends_from(pid, os.getpid()):
            self.refused += 1
            log.warning("refused the sealed weights to pid %d (uid %d): not a process of this server", pid, uid)
            conn.sendall(json.dumps({"error": "not a process of this server"}).encode())
            return
        header = json.dumps({"size": self._size, "parts": self._parts}).encode()
        socket.send_fds(conn, [header], [self._fd])
        self.served += 1

    def close(self) -> None:
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def fetch(path: str) -> tuple[int, int, dict[str, Any]]:
    """In a vLLM worker: (memfd, size, parts) from the server's hand-off socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(path)
            data, fds, flags, _ = socket.recv_fds(s, MAX_MESSAGE, 1)
        except OSError as e:
            raise CodemoatError(f"cannot reach the server's sealed weights at {path}: {e.strerror or e}") from None
    try:
        msg = json.loads(data or b"{}")
    except ValueError:
        msg = {}
    if not fds or "error" in msg or "size" not in msg:
        for fd in fds:
            os.close(fd)
        raise CodemoatError(f"the server refused the sealed weights: {msg.get('error', 'no descriptor')}")
    return fds[0], int(msg["size"]), msg.get("parts") or {}
