"""How codemoat reaches a TPM for raw commands (`attest.tpmcmd`): swtpm's command port on one TCP connection per
burst of commands (`SwtpmSocket`), any other TCTI (a device, tabrmd) through tpm2-tss's loader.

tpm2-tss's swtpm TCTI connects and disconnects around every command, which a TPM device (`/dev/tpmrm0`: one open
descriptor) never does; `SwtpmSocket` holds the connection until `idle()`. swtpm serves one connection at a time,
so a caller gives it back (`idle()`) before it waits on anything: another client's command then waits for at most
one burst.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

from .base import AttestError

_IO_TIMEOUT = 30.0  # seconds for one swtpm command (they take well under a millisecond)
MAX_RESPONSE = 4096  # bytes: a TPM response codemoat asks for is far shorter (TPM2_PT_MAX_RESPONSE_SIZE is 4096)


def _pt():  # tpm2-pytss is an optional extra (`.[tpm]`); import it only when a TPM is used
    # tpm2-tss writes every TPM error code to stderr; refusals here become one AttestError line instead.
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    try:
        import tpm2_pytss
    except ImportError:
        raise AttestError("TPM support is not installed (pip install 'codemoat[tpm]')") from None
    return tpm2_pytss


class _Closed(OSError):
    """swtpm closed the connection before answering a command it was sent."""


class SwtpmSocket:
    """swtpm's command port (`swtpm:host=H,port=P`), one TCP connection per burst: opened by the first command
    after `idle()`, closed by `idle()` (the transmit/receive pair `tpmcmd.Commands` uses). A swtpm started with
    `--server ...,disconnect` closes the connection after each answer: a command sent on a connection it had
    closed was never read, so it is sent again on a new one."""

    def __init__(self, host: str, port: int):
        self.addr = (host, port)
        self.sock: socket.socket | None = None
        self._command, self._reused = b"", False

    def _connect(self) -> None:
        self.sock = socket.create_connection(self.addr, timeout=_IO_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def transmit(self, command: bytes) -> None:
        self._command, self._reused = command, self.sock is not None
        if self.sock is None:
            self._connect()
        try:
            self.sock.sendall(command)  # type: ignore[union-attr]
        except OSError:
            if not self._reused:
                raise
            self._again()

    def _again(self) -> None:
        self.idle()
        self._connect()
        self._reused = False
        self.sock.sendall(self._command)  # type: ignore[union-attr]

    def receive(self) -> bytes:
        """One response, read as it arrives: swtpm writes it whole, so one `recv` is usually all (each one lets the
        GIL go and waits to take it back, which the main thread's Python can make slow: vault.tpmstart)."""
        try:
            got = self._more(b"")
        except _Closed:
            if not self._reused:
                raise
            self._again()
            got = self._more(b"")
        while len(got) < 10:
            got = self._more(got)
        (size,) = struct.unpack_from(">I", got, 2)
        if not 10 <= size <= MAX_RESPONSE:
            raise OSError(f"malformed TPM response (size {size})")
        while len(got) < size:
            got = self._more(got)
        if len(got) != size:  # one command in flight, one response: anything after it was not the TPM's
            raise OSError(f"malformed TPM response ({len(got) - size} bytes after its end)")
        return got

    def _more(self, got: bytes) -> bytes:
        """`got` and what the connection has next (a response's worth at most)."""
        assert self.sock is not None
        try:
            part = self.sock.recv(MAX_RESPONSE - len(got))
        except ConnectionResetError:
            part = b""
        if not part:
            raise (_Closed if not got else OSError)("swtpm closed the connection")
        return got + part

    def idle(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    close = idle


def _swtpm_address(conf: str) -> tuple[str, int] | None:
    """host and port of a tpm2-tss swtpm TCTI configuration (`host=H,port=P`, its defaults), else None."""
    kv = dict(part.partition("=")[::2] for part in conf.split(",") if part)
    if set(kv) - {"host", "port"}:
        return None
    try:
        return kv.get("host", "localhost"), int(kv.get("port", "2321"))
    except ValueError:
        return None


class _Tcti:
    """Any other TCTI (a device, tabrmd) through tpm2-tss's loader."""

    def __init__(self, tcti: Any):
        self.tcti = tcti
        self.transmit, self.receive = tcti.transmit, tcti.receive

    def idle(self) -> None:
        pass

    def close(self) -> None:
        self.tcti.close()


def open_transport(tcti: str) -> Any:
    name, _, conf = tcti.partition(":")
    addr = _swtpm_address(conf) if name == "swtpm" else None
    if addr is not None:
        return SwtpmSocket(*addr)
    try:
        return _Tcti(_pt().TCTILdr(name, conf))
    except AttestError:
        raise
    except Exception as e:  # TSS2_Exception and friends: one line, never a traceback
        raise AttestError(f"cannot reach the TPM at {tcti!r}: {e}") from None
