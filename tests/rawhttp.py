"""Raw-socket HTTP for the slow-client attack tests (tests/serve, tests/vault): what a server sends until it
closes the connection, failing the test if it holds the connection instead."""

from __future__ import annotations

import socket

import pytest

HANG = 60  # seconds a server may take before a held connection fails the test


def read_until_closed(s: socket.socket, hang: float = HANG) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed); the test fails after `hang` s."""
    s.settimeout(hang)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the connection was still held after {hang} s: {data[:200]!r}")
    return data
