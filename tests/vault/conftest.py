"""Fixtures for the vault: a vendor, this machine, a tiny real GGUF, and a real key server on 127.0.0.1."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from ports import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).parent))  # vaulthelp: this folder is a package, not on the path by itself


@pytest.fixture(autouse=True)
def vault_home(tmp_path, monkeypatch):
    """A fresh $CODEMOAT_HOME and temp dir for every test."""
    home = tmp_path / "home"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("CODEMOAT_HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmp))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return home


@pytest.fixture
def model(tmp_path) -> Path:
    """A small valid GGUF (one random 20 kB matrix, `ggufs.write_gguf`): what the vault seals and licenses.
    The magic followed by random bytes stood in for it until `vendor seal` refused a GGUF not whole."""
    from ggufs import write_gguf

    return write_gguf(tmp_path / "m.gguf", 20_000)


class KeyServerProcess:
    """The real key server app under uvicorn in a thread; `stop()` and `start()` it like an outage."""

    def __init__(self, vendor, port: int | None = None, clock=None):
        self.vendor, self.port, self.clock = vendor, port or free_port(), clock
        self._repick = port is None  # a port of free_port()'s another process may take before uvicorn binds it
        self.server = None
        self.thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> KeyServerProcess:
        import uvicorn

        from codemoat.serve.keyserver_app import create_app

        for _ in range(4):
            cfg = uvicorn.Config(
                create_app(self.vendor, self.clock), host="127.0.0.1", port=self.port, log_level="error", access_log=False
            )
            self.server = uvicorn.Server(cfg)
            self.thread = threading.Thread(target=self.server.run, daemon=True)
            self.thread.start()
            deadline = time.time() + 60  # generous: a loaded 2-core CI starts it in well under a second, mostly
            while time.time() < deadline and not self.server.started and self.thread.is_alive():
                time.sleep(0.02)
            if self.server.started:
                break
            if self.thread.is_alive() or not self._repick:
                raise RuntimeError("key server did not start")
            self.port = free_port()  # uvicorn could not bind it (taken meanwhile): another, before anyone knows its URL
        self._repick = False  # a restart (an outage's end) is on the same port: licenses name it
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("key server did not start")

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(timeout=10)
            self.server = None


@pytest.fixture
def keyserver(vendor):
    ks = KeyServerProcess(vendor).start()
    yield ks
    ks.stop()
