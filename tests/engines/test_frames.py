"""`child.Frames`: the length-prefixed pickles between serve and an engine process, read without waiting
(`pump`: one read; `drain`: all that is there) or waiting (`batch`), over a real socket pair."""

from __future__ import annotations

import socket

from codemoat.engines.child import Frames, frame


def _pair():
    a, b = socket.socketpair()
    return a, b, Frames(b)


def test_nothing_yet_is_an_empty_list_and_the_end_is_none():
    a, b, f = _pair()
    try:
        assert f.pump() == [] and f.drain() == []
        a.close()
        assert f.pump() is None
        assert f.drain() is None
    finally:
        b.close()


def test_drain_reads_past_one_buffer_and_pump_reads_once():
    """200 KiB of messages: one read takes 64 KiB at most (`pump` returns the whole messages in it, the rest
    waits in the buffer); `drain` reads until the socket has no more. A message cut by a read is kept whole."""
    a, b, f = _pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    msgs = [("chunk", i, "x" * 1000) for i in range(200)]
    try:
        a.sendall(b"".join(frame(m) for m in msgs))
        first = f.pump()
        assert 0 < len(first) < len(msgs) and first == msgs[: len(first)]
        rest = f.drain()
        assert first + rest == msgs
        a.sendall(frame(("stop",))[:3])  # a part of a header: no message yet
        assert f.drain() == []
        a.sendall(frame(("stop",))[3:])
        assert f.pump() == [("stop",)]
    finally:
        a.close()
        b.close()
