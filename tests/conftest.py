"""Shared fixtures: an isolated $CODEMOAT_HOME, a small real GGUF, free loopback ports, a real server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
BUNDLED = ROOT / "models" / "codemoat-tiny.gguf"
CODEMOAT = [sys.executable, "-m", "codemoat.cli.main"]


@pytest.fixture(autouse=True)
def home(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own data directory; nothing touches ~/.codemoat."""
    h = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("CODEMOAT_HOME", str(h))
    monkeypatch.delenv("CODEMOAT_CONFIG", raising=False)
    monkeypatch.delenv("CODEMOAT_DATABASE_URL", raising=False)
    return h


@pytest.fixture(scope="session")
def random_gguf(tmp_path_factory) -> Path:
    """A 2-layer llama GGUF with random weights and a real BPE tokenizer (loads in milliseconds)."""
    from tinymodel import build_tiny_gguf

    return build_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-test.gguf")


@pytest.fixture(scope="session")
def tiny_gguf(random_gguf) -> Path:
    """The bundled model when it is there (its text makes sense), else the random one."""
    return BUNDLED if BUNDLED.is_file() else random_gguf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(name="free_port")
def free_port_fixture() -> int:
    return free_port()


def run_cli(*args: str, env: dict | None = None, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `codemoat ARGS…` as a subprocess, as a user would."""
    e = dict(os.environ, **(env or {}))
    return subprocess.run([*CODEMOAT, *args], capture_output=True, text=True, env=e, input=input, timeout=timeout)


def create_token(*extra: str) -> str:
    r = run_cli("tokens", "create", "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["token"]


class ServerProcess:
    """`codemoat serve` in a subprocess on 127.0.0.1, waited for on /health."""

    def __init__(self, args: list[str], env: dict | None = None, wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ["CODEMOAT_HOME"]) / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            [*CODEMOAT, "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})),
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def serve_process() -> Iterator:
    """Factory: `serve_process(["--model", path])` starts a real server; all are stopped after the test."""
    started: list[ServerProcess] = []

    def start(args: list[str], env: dict | None = None, wait: bool = True) -> ServerProcess:
        s = ServerProcess(args, env, wait)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
