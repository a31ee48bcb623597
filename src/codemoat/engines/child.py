"""The engine process: `python -m codemoat.engines.child FD`, started by `engines.supervised`.

It reads one spec from the socket FD (engine class, model path, options), loads the engine, says
`("ready", facts)`, then serves generation requests until told to stop or until the socket closes
(the server went away). The model path may be `/proc/self/fd/N` of a sealed memfd inherited from
the server: the plaintext is never decrypted again, nor written anywhere.

Messages are length-prefixed pickles (`send`/`recv`), between two processes of the same program:
    server → engine   ("gen", rid, prompt, params) · ("cancel", rid) · ("logits", rid, prompt) · ("stop",)
    engine → server   ("ready", facts) · ("error", message) · ("chunk", rid, Chunk)
                      · ("done", rid, error or None) · ("result", rid, value, error or None)
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import threading
from typing import Any

_HEADER = struct.Struct(">I")
PR_SET_DUMPABLE, PR_GET_DUMPABLE = 4, 3
log = logging.getLogger("codemoat.engines")


def set_non_dumpable() -> bool:
    """prctl(PR_SET_DUMPABLE, 0): no core dumps, and /proc/PID/mem and ptrace need CAP_SYS_PTRACE."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def is_dumpable() -> bool:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 1


def send(sock: socket.socket, msg: Any) -> None:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def recv(stream) -> Any:
    """The next message from a buffered reader of the socket (`sock.makefile("rb")`); None at its end."""
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (n,) = _HEADER.unpack(head)
    data = stream.read(n)
    return pickle.loads(data) if len(data) == n else None


def error_text(exc: BaseException) -> str:
    from ..errors import CodemoatError
    from .base import PromptTooLong

    if isinstance(exc, (CodemoatError, PromptTooLong)):
        return str(exc)
    log.error("engine request failed", exc_info=exc)
    return f"internal error in the engine ({type(exc).__name__})"


class _Server:
    def __init__(self, engine: Any, sock: socket.socket):
        self.engine, self.sock = engine, sock
        self.tasks: dict[int, asyncio.Task] = {}

    def send(self, msg: Any) -> None:
        try:
            send(self.sock, msg)
        except OSError:  # the server is gone; the reader sees the end and stops us
            pass

    async def generate(self, rid: int, prompt: str | list[int], params: Any) -> None:
        try:
            async for c in self.engine.stream(prompt, params):
                self.send(("chunk", rid, c))
                if c.finish_reason:
                    return
        except asyncio.CancelledError:
            return  # the client went away: the server no longer listens for this request
        except Exception as e:
            self.send(("done", rid, error_text(e)))
            return
        self.send(("done", rid, None))

    async def call(self, rid: int, fn: Any, *args: Any) -> None:
        try:
            value = await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except Exception as e:
            self.send(("result", rid, None, error_text(e)))
        else:
            self.send(("result", rid, value, None))

    async def serve(self, inbox: asyncio.Queue) -> None:
        while True:
            msg = await inbox.get()
            if msg is None or msg[0] == "stop":
                break
            kind, rid = msg[0], msg[1]
            if kind == "gen":
                task = asyncio.create_task(self.generate(rid, msg[2], msg[3]))
            elif kind == "logits":
                task = asyncio.create_task(self.call(rid, self.engine.logits, msg[2]))
            elif kind == "cancel":
                if (t := self.tasks.get(rid)) is not None:
                    t.cancel()
                continue
            else:
                continue
            self.tasks[rid] = task
            task.add_done_callback(lambda _t, rid=rid: self.tasks.pop(rid, None))
        for t in list(self.tasks.values()):
            t.cancel()


def _reader(stream, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue) -> None:
    while True:
        try:
            msg = recv(stream)
        except (OSError, pickle.UnpicklingError, EOFError):
            msg = None
        loop.call_soon_threadsafe(inbox.put_nowait, msg)
        if msg is None or msg[0] == "stop":
            return


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when its engine stops
    stream = sock.makefile("rb")
    spec = recv(stream)
    if spec is None:
        return 1
    set_non_dumpable()  # exec made this process dumpable again; the weights are mapped below
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logging.getLogger("codemoat").addHandler(handler)
    logging.getLogger("codemoat").setLevel(spec.get("log_level", logging.INFO))

    from ..errors import CodemoatError
    from . import engine_class

    try:
        engine = engine_class(spec["engine"]).from_path(spec["path"], **spec["opts"])
    except CodemoatError as e:
        send(sock, ("error", str(e)))
        return 1
    send(sock, ("ready", {"n_ctx": engine.n_ctx, "n_vocab": getattr(engine, "n_vocab", None),
                          "health": {**engine.health(), "non_dumpable": not is_dumpable()}, "pid": os.getpid()}))

    async def run() -> None:
        inbox: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=_reader, args=(stream, asyncio.get_running_loop(), inbox), daemon=True).start()
        await _Server(engine, sock).serve(inbox)

    try:
        asyncio.run(run())
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
