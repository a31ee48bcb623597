"""Shared fixtures: an isolated $CODEMOAT_HOME, a small real GGUF, free loopback ports, a real server."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ports import free_port

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
    monkeypatch.setenv("CODEMOAT_VAULT__TPM", "off")  # never a host's /dev/tpm*: TPM tests start their own swtpm
    return h


@pytest.fixture(autouse=True)
def _apps_released() -> Iterator[None]:
    """After each test, FastAPI lets go of the apps the test made. Its dependency classification caches
    (fastapi.dependencies.models, 4,096 entries each) hold every route's endpoint, a closure over its app, so
    the apps of the last ~100 tests stayed alive with their database engines' connections and audit logs:
    the test process held over 1,000 descriptors (past select()'s FD_SETSIZE) late in the suite. Once the
    process holds 100 more than after the last one, a full collection frees those cycles now, not whenever."""
    yield
    models = sys.modules.get("fastapi.dependencies.models")
    for name in ("_is_gen_callable_cached", "_is_async_gen_callable_cached", "_is_coroutine_callable_cached"):
        getattr(getattr(models, name, None), "cache_clear", lambda: None)()
    if len(os.listdir("/proc/self/fd")) > _fds_after_collect[0] + 100:
        gc.collect()
        _fds_after_collect[0] = len(os.listdir("/proc/self/fd"))


_fds_after_collect = [0]  # descriptors open after the last full collection `_apps_released` asked for


@pytest.fixture(scope="session")
def random_gguf(tmp_path_factory) -> Path:
    """A 2-layer llama GGUF with random weights and a real BPE tokenizer (loads in milliseconds)."""
    from tinymodel import build_tiny_gguf

    return build_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-test.gguf")


@pytest.fixture(scope="module")
def tiny_llm(random_gguf):
    """A llama.cpp engine of the random GGUF (model id "tiny", 256-token context, one thread), shared
    by the apps of one test module (hold it in a holder whose close() leaves it open)."""
    from codemoat.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine.from_path(random_gguf, model_id="tiny", n_ctx=256, n_threads=1)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def tiny_gguf(random_gguf) -> Path:
    """The bundled model when it is there (its text makes sense), else the random one."""
    return BUNDLED if BUNDLED.is_file() else random_gguf


@pytest.fixture(scope="session")
def quantised(tmp_path_factory, tiny_gguf):
    """`quantised("Q4_K_M")`: the bundled model quantised by llama.cpp (Q4_0, Q8_0, Q4_K_M, Q5_K_M,
    Q6_K), built once per session. Its rows (192) are not multiples of 256, so the K-quant files
    hold llama.cpp's fallbacks (Q5_0/Q5_1/Q8_0) for most matrices: `tinymodel.tensor_types` says."""
    from tinymodel import quantise

    out = tmp_path_factory.mktemp("quantised")
    built: dict[str, Path] = {}

    def get(quant: str) -> Path:
        if quant not in built:
            built[quant] = quantise(tiny_gguf, out / f"{tiny_gguf.stem}-{quant.lower()}.gguf", quant)
        return built[quant]

    return get


@pytest.fixture(scope="session")
def wide_q4_k_m(tmp_path_factory) -> Path:
    """A random llama with real dimensions (hidden 1024, FFN 2816, 2 layers, 16 heads) in Q4_K_M:
    rows divisible by 256, so the Q4_K/Q6_K kernels (AMX tiles, repacked layouts) really run."""
    from tinymodel import build_tiny_gguf, quantise

    d = tmp_path_factory.mktemp("wide")
    f16 = build_tiny_gguf(d / "wide-f16.gguf", n_embd=1024, n_ff=2816, n_head=16, n_layer=2, dtype="F16", seed=3)
    q = quantise(f16, d / "wide-q4_k_m.gguf", "Q4_K_M")
    f16.unlink()
    return q


@pytest.fixture
def tokenised(monkeypatch) -> list[int]:
    """The byte lengths of the texts llama.cpp's tokenizer is called on (llama_cpp.llama_tokenize, as codemoat calls it)."""
    import llama_cpp

    calls: list[int] = []
    real = llama_cpp.llama_tokenize

    def counted(*a):
        calls.append(a[2])
        return real(*a)

    monkeypatch.setattr(llama_cpp, "llama_tokenize", counted)
    return calls


@pytest.fixture(name="free_port")
def free_port_fixture() -> int:
    return free_port()


def run_cli(*args: str, env: dict | None = None, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `codemoat ARGS…` as a subprocess, as a user would."""
    e = dict(os.environ, **(env or {}))
    return subprocess.run([*CODEMOAT, *args], capture_output=True, text=True, env=e, input=input, timeout=timeout)


def verified_audit() -> dict:
    """`codemoat audit verify --json` on this test's deployment: it must pass; returns its report."""
    r = run_cli("audit", "verify", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def column(url: str, sql: str, **params) -> list:
    """The first column of the rows `sql` selects in the database at `url` (an engine of its own, disposed)."""
    import sqlalchemy as sa

    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            return list(c.execute(sa.text(sql), params).scalars())
    finally:
        eng.dispose()


def files_sized(size: int, since: float, *roots: str) -> list[str]:
    """Files of exactly `size` bytes changed since `since` (a second's slack) under `roots`, links not
    followed: where a plaintext copy of weights of that size would have been written."""
    found = []
    for base in roots:
        for d, _, names in os.walk(base):
            for n in names:
                try:
                    st = os.stat(os.path.join(d, n), follow_symlinks=False)
                except OSError:
                    continue
                if st.st_size == size and st.st_mtime >= since - 1:
                    found.append(os.path.join(d, n))
    return found


def create_token(*extra: str) -> str:
    r = run_cli("tokens", "create", "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["token"]


class ServerProcess:
    """`codemoat serve` in a subprocess on 127.0.0.1, waited for on /health."""

    def __init__(self, args: list[str], env: dict | None = None, wait: bool = True):
        self._args, self._env = args, dict(os.environ, **(env or {}))
        self._spawn()
        if wait:
            try:
                self.wait_ready()
            except BaseException:  # the caller gets no object to stop: a server still starting was left running
                self.stop()
                raise

    def _spawn(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(self._env["CODEMOAT_HOME"]) / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            [*CODEMOAT, "serve", "--host", "127.0.0.1", "--port", str(self.port), *self._args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self._env,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline, respawns = time.time() + timeout, 0
        while time.time() < deadline:
            if self.proc.poll() is not None:
                # free_port() let the port go before serve bound it: another process (a test or a CI beside
                # this one) may have taken it meanwhile. Serve refuses in one line before doing anything else.
                if f"cannot listen on 127.0.0.1:{self.port}: Address already in use" in self.output() and respawns < 3:
                    respawns += 1
                    self.log.close()
                    self._spawn()
                    continue
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


# -- PostgreSQL: a private cluster per session (tests/pg.py), a fresh database per test --------
@pytest.fixture(scope="session")
def pg_cluster():
    """A private PostgreSQL cluster on a free loopback port; skipped (with the reason) only when
    Debian's postgresql package or psycopg is not installed."""
    from pg import PgCluster, pg_bin

    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed here (Debian package `postgresql`; .ci/run installs it)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (the `postgres` extra)")
    cluster = PgCluster(bindir).start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, home, monkeypatch) -> Iterator[str]:
    """Shared state on each backend in turn: SQLite under $CODEMOAT_HOME, then a fresh PostgreSQL
    database; `CODEMOAT_DATABASE_URL` is set so the CLI and servers the test starts use it too."""
    if request.param == "sqlite":
        url = f"sqlite:///{home / 'codemoat.db'}"
        monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
        yield url
        return
    cluster = request.getfixturevalue("pg_cluster")
    url = cluster.new_database()
    monkeypatch.setenv("CODEMOAT_DATABASE_URL", url)
    yield url
    cluster.drop_database(url)  # WITH (FORCE): connections the test left open are closed


# -- the vault's parties: a vendor, this machine, a tiny real GGUF to seal ----------------------
@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory) -> Path:
    """A real llama-architecture GGUF (random weights) that llama.cpp loads in milliseconds."""
    from tinymodel import build_tiny_gguf

    return build_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture
def vendor(tmp_path):
    """A fresh vendor store (keys and database) in the test's folder."""
    from codemoat.vault.vendor import Vendor

    v = Vendor.init(tmp_path / "vendor")
    yield v
    v.close()


@pytest.fixture
def machine():
    """This machine's key, made in the test's $CODEMOAT_HOME."""
    from codemoat.vault.machine import MachineKey

    return MachineKey.load_or_create()
