"""`free_port()`: a TCP port on 127.0.0.1 that nothing listens on now (for a server a test starts). Every test folder
can import it (`tests/` is on the path); tests/conftest.py also offers it as the `free_port` fixture."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
