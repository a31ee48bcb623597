"""Running the server (serve/run.py): the listening socket and its one-line errors."""

from __future__ import annotations

import gc
import socket
import weakref

import pytest
from cli_errors import one_line_error
from conftest import run_cli

from codemoat.errors import CodemoatError
from codemoat.serve.run import freeze_heap, listen


def test_listen_binds_a_free_port_with_nodelay():
    sock = listen("127.0.0.1", 0)
    try:
        assert sock.getsockname()[1] > 0 and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


def test_a_busy_port_is_one_line(random_gguf):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        with pytest.raises(CodemoatError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            listen("127.0.0.1", port)
        # said before anything is loaded: the one line alone on stderr (no engine's or licence's log line
        # before it), even for a model that could not be opened, which start-up would have reported first
        for model in (random_gguf, random_gguf.with_name("missing.gguf")):
            r = run_cli("serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port))
            one_line_error(r, f"cannot listen on 127.0.0.1:{port}: Address already in use")
    finally:
        busy.close()


def test_a_port_another_serve_took_is_refused_while_that_one_still_loads(random_gguf):
    """Was broken: `listen` only bound, and with SO_REUSEADDR Linux lets a second socket bind a port whose first is
    bound and not yet listening: a second `codemoat serve` on a port the first took before loading its model was not
    refused, loaded its own, and then (uvloop ignores a failed listen() on a socket it is handed) said "serving" and
    answered nothing. Now the first holds the port listening: the second is the one line at once. The negatives: a
    port whose last server went (its connections in TIME_WAIT) is listened on again, and a host that cannot be
    encoded is one line too."""
    first = listen("127.0.0.1", 0)
    port = first.getsockname()[1]
    try:
        assert first.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        with pytest.raises(CodemoatError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            listen("127.0.0.1", port)
        r = run_cli("serve", "--model", str(random_gguf), "--host", "127.0.0.1", "--port", str(port), timeout=60)
        one_line_error(r, f"cannot listen on 127.0.0.1:{port}: Address already in use")
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn, _ = first.accept()
        conn.close()  # the server's side closes first: its end of the connection waits in TIME_WAIT
        client.close()
    finally:
        first.close()
    listen("127.0.0.1", port).close()
    with pytest.raises(CodemoatError, match="cannot listen on"):
        listen("\u00fc" * 70, 0)


def test_what_start_up_made_is_out_of_the_collectors_sight():
    """`run` freezes the heap before serving: objects made before it (the model's libraries) are no
    longer walked by a full collection; objects made while serving still are."""
    made = [[i] for i in range(1000)]
    ids = {id(x) for x in made}
    assert sum(id(o) in ids for o in gc.get_objects()) == 1000
    try:
        freeze_heap()
        later = [[i] for i in range(10)]
        tracked = {id(o) for o in gc.get_objects()}
        assert not ids & tracked
        assert {id(x) for x in later} <= tracked
    finally:
        gc.unfreeze()


def test_an_engine_let_go_is_freed_with_the_heap_frozen(random_gguf):
    """Lease loss while serving: the engine loaded before `freeze_heap` (frozen with the start-up heap,
    and a reference cycle through its tracked stream) is freed once the holder unloads it, its weights
    with it; frozen for good, it would have stayed in memory."""
    from codemoat.engines.holder import ModelHolder
    from codemoat.engines.llamacpp import LlamaCppEngine

    holder = ModelHolder("tiny", loader=lambda: LlamaCppEngine.from_path(random_gguf, model_id="tiny", n_ctx=256, n_threads=1))
    holder.load()
    engine = weakref.ref(holder.get())
    try:
        freeze_heap()
        holder.unload("lease lost")
        gc.collect()
        assert engine() is None
    finally:
        gc.unfreeze()
