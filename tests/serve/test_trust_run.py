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
