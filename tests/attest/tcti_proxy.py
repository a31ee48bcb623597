"""A man in the middle of the TPM's TCTI on 127.0.0.1: what the service account can put between codemoat and the
chip (it sets `CODEMOAT_TPM_TCTI`, or tpm.json's TCTI). Every command goes to the real swtpm; `rewrite(cc,
command, response)` may change the answer on the way back. The control port (port + 1) is passed through."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable

# (command code, the command's bytes, the chip's answer) -> what the client gets
Rewrite = Callable[[int, bytes, bytes], bytes]


def _frame(s: socket.socket) -> bytes | None:
    """One TPM command or response (10-byte header, its size field), None at EOF."""
    head = b""
    while len(head) < 10:
        got = s.recv(10 - len(head))
        if not got:
            return None
        head += got
    (size,) = struct.unpack_from(">I", head, 2)
    body = b""
    while len(head) + len(body) < size:
        got = s.recv(size - 10 - len(body))
        if not got:
            return None
        body += got
    return head + body


class TctiProxy:
    def __init__(self, upstream_port: int, rewrite: Rewrite):
        self.up, self.rewrite = upstream_port, rewrite
        self._socks: list[socket.socket] = []
        for _ in range(50):  # two adjacent free ports: the TCTI sends control commands to port + 1
            data, ctrl = socket.socket(), socket.socket()
            data.bind(("127.0.0.1", 0))
            try:
                ctrl.bind(("127.0.0.1", data.getsockname()[1] + 1))
                break
            except OSError:
                data.close()
                ctrl.close()
        else:
            raise RuntimeError("no two adjacent free ports on 127.0.0.1")
        self.port = data.getsockname()[1]
        for s, fn in ((data, self._commands), (ctrl, self._control)):
            s.listen(8)
            self._socks.append(s)
            threading.Thread(target=self._accept, args=(s, fn), daemon=True).start()

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def _accept(self, srv: socket.socket, fn: Callable[[socket.socket], None]) -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=fn, args=(c,), daemon=True).start()

    def _commands(self, c: socket.socket) -> None:
        with c, socket.create_connection(("127.0.0.1", self.up)) as u:
            while (cmd := _frame(c)) is not None:
                u.sendall(cmd)
                resp = _frame(u)
                if resp is None:
                    return
                c.sendall(self.rewrite(struct.unpack_from(">I", cmd, 6)[0], cmd, resp))

    def _control(self, c: socket.socket) -> None:
        with c, socket.create_connection(("127.0.0.1", self.up + 1)) as u:

            def pipe(a: socket.socket, b: socket.socket) -> None:
                try:
                    while got := a.recv(65536):
                        b.sendall(got)
                except OSError:
                    pass
                finally:
                    try:
                        b.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass

            t = threading.Thread(target=pipe, args=(u, c), daemon=True)
            t.start()
            pipe(c, u)
            t.join()

    def close(self) -> None:
        for s in self._socks:
            s.close()
