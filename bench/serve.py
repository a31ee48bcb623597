"""Serving under load: codemoat (batched) vs llama.cpp's own C++ `llama-server`, side by side in one run.

Servers, each on the same GGUF with the same threads and the same context per slot:
  codemoat            batched llama.cpp engine, model.parallel = P slots (the default engine)
  codemoat-1          model.parallel = 1: one request at a time (the engine before batching)
  codemoat-inline     (opt-in) model.isolation = inline: the batched engine in the server's own process, no
                      engine process to restart after a crash: what that isolation costs a request
  llama-server        llama.cpp's server, `-np P -cb`, built from the llama.cpp source vendored in
                      llama-cpp-python's sdist (same commit as the engine) under ~/.cache/codemoat-bench
                      by `--build` (CMake, -DLLAMA_BUILD_SERVER=ON, -j2), never by `make test`
  llama_cpp.server    llama-cpp-python's OpenAI server (continuity with earlier results)

Scenarios, each run on one server at a time, the servers' order alternating between scenarios so
machine noise hits them alike: one client (p50 latency, streaming time to first token), 8 and 32
concurrent clients with 32- and 128-token greedy completions (tokens/s, and tokens per CPU-second of
the server's processes), an editor-like mix (each client resends its growing file prefix every 150 ms)
and a 3,000-token /infill that the server must trim (time to first token, next to an /infill that fits
with the same final prompt size). Models: the bundled one, a ~100M-parameter random llama built here
(Q4_K_M) and Gemma 3 270M Q4_K_M (bench/gemma.py). Results: bench/results/serve.md.

    .venv/bin/python bench/serve.py --build                  # once: builds llama-server (~30-60 min on 2 loaded cores)
    .venv/bin/python bench/serve.py --models bundled,random100m,gemma
    .venv/bin/python bench/serve.py --models bundled --quick --servers codemoat,codemoat-1,llama-server,llama-server-1,llama_cpp.server \
        --baseline /tmp/base/src       # + llama-server -np 1, and codemoat from another checkout (git archive HEAD src)
    .venv/bin/python bench/serve.py --models bundled,random100m,gemma --quick --servers codemoat,codemoat-1,llama-server,llama-server-1 \
        --scenarios c8_128 --threads 2 --out /tmp/batching.md   # what batching gains, on both engines, both cores

The results file keeps what this script does not write: each run replaces only its models' `### <model>:`
sections (each says its command, time and load), and the text, targets and notes around them stay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _results import parts as cut  # bench/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CODEMOAT_BENCH_CACHE", Path.home() / ".cache" / "codemoat-bench"))
LLAMA_SERVER = CACHE / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "build" / "bin" / "llama-server"
PROMPT = 'import os\nimport sys\n\n\ndef walk_python_files(root):\n    """Yield every .py file under root."""\n    for dirpath, dirnames, filenames in os.walk(root):\n'
FILE = "".join(
    f"def handler_{i}(request, amount_cents: int) -> dict:\n    fee = amount_cents * {i} // 1000\n"
    f"    return {{'status': 'ok', 'fee': fee, 'id': {i}}}\n\n\n"
    for i in range(40)
)
SERVERS = ("codemoat", "codemoat-1", "llama-server", "llama_cpp.server")
ONE_SLOT = "llama-server-1"  # --servers ...,llama-server-1: llama-server -np 1 (no batching)
INLINE = "codemoat-inline"  # --servers ...,codemoat-inline: model.isolation = inline (no engine process)
BASE = "codemoat-base"  # --baseline: codemoat (batched) from another checkout's src/, beside this one


def commit() -> str:
    """This checkout's commit (with "+changes" when the work tree differs from it)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=ROOT).returncode != 0
    return head + (" + uncommitted changes in src/" if dirty else "") if head else "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VENV_LIB = (
    Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "llama_cpp" / "lib"
)


def _patch(src: Path) -> None:
    """Build only what the server adds: libllama and libmtmd are llama-cpp-python's own (the same
    source, already built by pip), and the web UI's assets are never downloaded."""
    edits = [
        (
            src / "CMakeLists.txt",
            "add_subdirectory(src)\n",
            "add_library(llama SHARED IMPORTED GLOBAL)  # codemoat bench: llama-cpp-python's libllama\n"
            f'set_target_properties(llama PROPERTIES IMPORTED_LOCATION {VENV_LIB}/libllama.so INTERFACE_INCLUDE_DIRECTORIES "${{CMAKE_CURRENT_SOURCE_DIR}}/include" '
            "INTERFACE_LINK_LIBRARIES ggml INTERFACE_COMPILE_DEFINITIONS LLAMA_SHARED)\n",
        ),
        (
            src / "CMakeLists.txt",
            "install(TARGETS llama LIBRARY PUBLIC_HEADER)",
            "# install(TARGETS llama LIBRARY PUBLIC_HEADER)",
        ),
        (
            src / "tools" / "CMakeLists.txt",
            "    add_subdirectory(mtmd)\n",
            "    add_library(mtmd SHARED IMPORTED GLOBAL)  # codemoat bench: llama-cpp-python's libmtmd\n"
            f'    set_target_properties(mtmd PROPERTIES IMPORTED_LOCATION {VENV_LIB}/libmtmd.so INTERFACE_INCLUDE_DIRECTORIES "${{CMAKE_CURRENT_SOURCE_DIR}}/mtmd")\n',
        ),
        (
            src / "scripts" / "ui-assets.cmake",
            'set(LLAMA_UI_GZIP     "" CACHE STRING "Apply gzip compress to assets to save bandwidth")\n',
            'set(LLAMA_UI_GZIP     "" CACHE STRING "Apply gzip compress to assets to save bandwidth")\nset(HF_ENABLED OFF)\n',
        ),
    ]
    for path, old, new in edits:
        text = path.read_text()
        if new not in text:  # once
            path.write_text(text.replace(old, new, 1))
    # code a /v1/completions or /infill request never runs (chat templates and parsers, argument
    # parsing, JSON schemas, tools) is compiled without optimisation, so that it builds on 2 loaded cores
    cold = {
        src / "common" / "CMakeLists.txt": "file(GLOB CODEMOAT_COLD "
        + " ".join(
            "${CMAKE_CURRENT_SOURCE_DIR}/" + f
            for f in (
                "parsers/*.cpp jinja/*.cpp chat*.cpp arg.cpp json-schema*.cpp peg-parser.cpp preset.cpp download.cpp "
                "hf-cache.cpp console.cpp debug.cpp imatrix-loader.cpp llguidance.cpp reasoning-budget.cpp subproc.cpp fit.cpp"
            ).split()
        )
        + ')\nset_source_files_properties(${CODEMOAT_COLD} PROPERTIES COMPILE_OPTIONS "-O0")\n',
        src
        / "tools"
        / "server"
        / "CMakeLists.txt": "set_source_files_properties(server-chat.cpp server-tools.cpp server-mcp.cpp "
        'server-schema.cpp server-models.cpp PROPERTIES COMPILE_OPTIONS "-O0")\n',
    }
    for path, block in cold.items():
        text = path.read_text()
        if "# codemoat bench" not in text:
            path.write_text(text + "\n# codemoat bench: not on the completion path\n" + block)


def build_llama_server() -> Path:
    """llama-server from the llama.cpp that llama-cpp-python 0.3.36 vendors (its sdist, from pip)."""
    if LLAMA_SERVER.is_file():
        return LLAMA_SERVER
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / "llama_cpp_python-0.3.36.tar.gz"
    if not sdist.is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "llama-cpp-python==0.3.36",
                "--no-binary",
                ":all:",
                "--no-deps",
                "-d",
                str(CACHE),
            ],
            check=True,
        )
    src = LLAMA_SERVER.parents[2]
    if not src.is_dir():
        subprocess.run(["tar", "xzf", str(sdist), "-C", str(CACHE)], check=True)
    _patch(src)
    flags = ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF"]
    subprocess.run(
        ["cmake", "-B", "build", *flags, "-DLLAMA_USE_PREBUILT_UI=OFF", "-DCMAKE_BUILD_TYPE=Release"], cwd=src, check=True
    )
    subprocess.run(["cmake", "--build", "build", "--target", "llama-server", "-j2"], cwd=src, check=True)
    return LLAMA_SERVER


def random_100m(f16: bool = False) -> Path:
    """A random-weight llama of ~100M parameters (hidden 1024, 6 layers, FFN 4096) in Q4_K_M, built once;
    `f16`: the same weights kept in F16 (203 MB, `random100m-f16`: reading them costs more than the
    arithmetic on them, so a step of many rows costs far less per row than one)."""
    out = CACHE / ("random-100m-f16.gguf" if f16 else "random-100m-q4_k_m.gguf")
    if out.is_file():
        return out
    sys.path.insert(0, str(ROOT / "tests"))
    from tinymodel import build_tiny_gguf, quantise

    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / "random-100m-f16.tmp.gguf"
    build_tiny_gguf(tmp, n_embd=1024, n_ff=4096, n_head=16, n_layer=6, n_ctx=4096, dtype="F16", seed=5)
    import gguf
    import numpy as np

    # random weights pick an end-of-generation token within a few tokens; with the control tokens'
    # output rows zeroed their logit is 0, below the largest of the others, so answers run their length
    r = gguf.GGUFReader(str(tmp), "r+")
    field = r.fields["tokenizer.ggml.token_type"]
    types = np.array([int(field.parts[i][0]) for i in field.data])
    head = next(t for t in r.tensors if t.name == "output.weight")
    head.data[types == 3, :] = 0
    del r
    if f16:
        tmp.rename(out)
    else:
        quantise(tmp, out, "Q4_K_M")
        tmp.unlink()
    return out


def model_path(name: str) -> Path:
    if name == "bundled":
        return ROOT / "models" / "codemoat-tiny.gguf"
    if name == "random100m":
        return random_100m()
    if name == "random100m-f16":
        return random_100m(f16=True)
    if name == "gemma":
        sys.path.insert(0, str(ROOT / "bench"))
        from gemma import gemma_path

        return gemma_path()
    return Path(name)


def cpu_path(model: Path, threads: int):
    """codemoat's own choice of llama.cpp CPU kernels for `model` on this machine (`engines.cpu.choose`, cached per
    CPU and build like the server's): on a CPU where the extra buffer types crash or disagree, `llama-server` is
    given `--no-repack`, the same switch, so that both decode with the same kernels."""
    from codemoat.engines import cpu

    return cpu.choose("auto", model, n_threads=threads)


class Servers:
    """The four servers on one model, started together, stopped together."""

    def __init__(self, model: Path, args: argparse.Namespace, token: str, env: dict, variants: dict | None = None):
        """`variants`: more codemoat servers, name -> environment over codemoat's (bench/serve_before.py: an
        older checkout's code through PYTHONPATH)."""
        self.procs: dict[str, subprocess.Popen] = {}
        self.urls: dict[str, str] = {}
        self.headers: dict[str, dict] = {}
        self.homes: list[Path] = []
        py, t, ctx, par = sys.executable, str(args.threads), args.n_ctx, args.parallel
        # llama.cpp's extra CPU buffer types (AMX, repacked kernels) kill a quantised model's first decode on some
        # CPUs (docs/llamacpp-amx.md): codemoat's self-test decides, and the references then run the same kernels
        self.cpu = cpu_path(model, args.threads)
        nr = [] if self.cpu.use_extra_bufts else ["--no-repack"]
        cm = [py, "-m", "codemoat.cli.main", "serve", "--model", str(model), "--model-id", "m", "--n-ctx", str(ctx)]
        cm_env = dict(env, CODEMOAT_MODEL__N_THREADS=t, CODEMOAT_MODEL__MAX_TOKENS_LIMIT="1024")
        cmds = {
            "codemoat": (cm, dict(cm_env, CODEMOAT_MODEL__PARALLEL=str(par))),
            "codemoat-1": (cm, dict(cm_env, CODEMOAT_MODEL__PARALLEL="1")),
            INLINE: (cm, dict(cm_env, CODEMOAT_MODEL__PARALLEL=str(par), CODEMOAT_MODEL__ISOLATION="inline")),
            "llama-server": (
                [str(LLAMA_SERVER), "-m", str(model), "-a", "m", "-c", str(ctx * par), "-np", str(par), "-cb"]
                + ["-t", t, "-tb", t, "-fa", "off", "--api-key", token, "--host", "127.0.0.1", "--no-webui", *nr],
                dict(env, LD_LIBRARY_PATH=str(VENV_LIB)),  # the engine's own libllama and ggml
            ),
            "llama-server-1": (  # one slot: what batching gains on llama.cpp's own server, on this machine
                [str(LLAMA_SERVER), "-m", str(model), "-a", "m", "-c", str(ctx), "-np", "1"]
                + ["-t", t, "-tb", t, "-fa", "off", "--api-key", token, "--host", "127.0.0.1", "--no-webui", *nr],
                dict(env, LD_LIBRARY_PATH=str(VENV_LIB)),
            ),
            "llama_cpp.server": (
                [py, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", "m", "--n_ctx", str(ctx)]
                + ["--n_threads", t, "--n_threads_batch", t, "--api_key", token],
                env,
            ),
        }
        cmds.update({name: (cm, dict(cm_env, **extra)) for name, extra in (variants or {}).items()})
        for name in args.servers:
            if name.startswith("llama-server") and not LLAMA_SERVER.is_file():
                print("llama-server is not built (bench/serve.py --build): its column is left out", file=sys.stderr)
                continue
            if name == "llama_cpp.server" and not self.cpu.use_extra_bufts:
                print(
                    f"llama_cpp.server has no switch for llama.cpp's extra CPU buffer types and would die on this CPU "
                    f"({self.cpu.reason}): its column is left out",
                    file=sys.stderr,
                )
                continue
            cmd, e = cmds[name]
            key = token
            if name.startswith("codemoat"):  # each its own home: its own database, audit log and token
                home = Path(tempfile.mkdtemp())
                self.homes.append(home)
                e = dict(e, CODEMOAT_HOME=str(home))
                out = subprocess.check_output(
                    [py, "-m", "codemoat.cli.main", "tokens", "create", "--name", "bench", "--json"], env=e
                )
                key = json.loads(out)["token"]
            port = free_port()
            self.procs[name] = subprocess.Popen(
                cmd + ["--port", str(port)], env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            self.urls[name] = f"http://127.0.0.1:{port}"
            self.headers[name] = {"Authorization": f"Bearer {key}"}
        try:
            for name, p in self.procs.items():
                self._wait(name, p)
        except BaseException:  # one did not start: stop the others (they outlived the bench before)
            self.stop()
            raise

    def _wait(self, name: str, proc: subprocess.Popen) -> None:
        for _ in range(3000):
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited: {proc.returncode}")
            try:
                if httpx.get(self.urls[name] + "/v1/models", headers=self.headers[name], timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"{name} did not start")

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for h in self.homes:
            shutil.rmtree(h, ignore_errors=True)


def completion(prompt: str, tokens: int, stream: bool = False) -> dict:
    # greedy, fixed length, no stop strings: every server does the same work (lengths are reported)
    return {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": stream}


async def one(c: httpx.AsyncClient, prompt: str, tokens: int, stream: bool = False) -> tuple[float, float, int]:
    """(latency, time to first token, tokens) of one /v1/completions request."""
    t0 = time.perf_counter()
    if not stream:
        r = await c.post("/v1/completions", json=completion(prompt, tokens))
        r.raise_for_status()
        return time.perf_counter() - t0, 0.0, r.json()["usage"]["completion_tokens"]
    ttft, first, n = 0.0, 0.0, 0
    async with c.stream("POST", "/v1/completions", json=completion(prompt, tokens, True)) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                first = first or time.perf_counter() - t0
                if not ttft and json.loads(line[6:])["choices"][0]["text"]:
                    ttft = time.perf_counter() - t0
                n += 1
    # an answer whose every event is empty text (a random model's bytes that never make a character): its first event
    return time.perf_counter() - t0, ttft or first, n


def client(url: str, headers: dict, n: int, keepalive: bool = False) -> httpx.AsyncClient:
    # a connection per request for every server: llama-server closes idle keep-alive connections, and a
    # reused one it had closed failed as "Server disconnected without sending a response"
    # (bench/serve_before.py keeps them, as the 2026-11-28 run did: no llama-server there)
    limits = httpx.Limits(max_connections=n + 2, max_keepalive_connections=n + 2 if keepalive else 0)
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits)


async def single(url: str, headers: dict, reps: int) -> dict:
    async with client(url, headers, 1) as c:
        lat = [(await one(c, PROMPT, 32))[0] for _ in range(reps)]
        ttft = [(await one(c, PROMPT, 32, stream=True))[1] for _ in range(reps)]
    return {"p50": statistics.median(lat), "ttft": statistics.median(ttft), "lats": lat, "ttfts": ttft}


async def _paired(servers: Servers, reps: int, warm: int) -> dict[str, dict]:
    """`reps` turns, each visiting every server in turn (order alternating, ABBA), so that a load coming and
    going on the shared machine hits them alike and turn i of each server forms a pair. A server's turn: a
    streamed request right after the other server's turn (its caches cold: "cold"), then a whole request
    ("lats") and a streamed one ("ttfts") on the caches its own requests left, as when it serves one client
    alone (what the row measured before). The first `warm` turns are not counted."""
    names = list(servers.urls)
    out = {s: {"lats": [], "ttfts": [], "cold": []} for s in names}
    cs = {s: client(servers.urls[s], servers.headers[s], 1) for s in names}
    try:
        for i in range(-warm, reps):
            for s in names if i % 2 == 0 else reversed(names):
                cold = (await one(cs[s], PROMPT, 32, stream=True))[1]
                lat = (await one(cs[s], PROMPT, 32))[0]
                ttft = (await one(cs[s], PROMPT, 32, stream=True))[1]
                if i >= 0:
                    out[s]["cold"].append(cold)
                    out[s]["lats"].append(lat)
                    out[s]["ttfts"].append(ttft)
    finally:
        for c in cs.values():
            await c.aclose()
    return out


def typing_start(model: Path, n_ctx: int, want: int = 1250) -> int:
    """Characters of FILE that make `want` tokens of `model`'s vocabulary, or 70 % of its slot's context if
    that is less (the bundled model was trained on 512 tokens): where the typing row's file prefix starts."""
    from codemoat.engines.llamacpp import LlamaCppEngine
    from codemoat.engines.llamaload import training_context

    vocab = LlamaCppEngine.front(str(model))
    try:
        slot = min(n_ctx, training_context(vocab._llm.metadata, n_ctx))
        want = min(want, int(slot * 0.7))
        lo, hi = 1, len(FILE) - 400
        while lo < hi:  # the most characters whose tokens are at most `want`
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(vocab.tokenize(FILE[:mid], special=False)) <= want else (lo, mid - 1)
        return lo
    finally:
        vocab.close()


async def _typing(servers: Servers, reps: int, warm: int, start: int) -> dict[str, dict]:
    """One developer typing in a file of ~1,250 tokens (`typing_start`): turn i sends the file's first start + 3 i characters
    (three more each time, as typed) to every server in turn (ABBA, as `_paired`), a streamed 16-token
    completion, and takes its time to first token. Each server's slots hold its previous prompt, so what a turn
    costs is the cached prefix found again, the few tokens that changed read, and the first token: the first
    token an editor's user waits for, where the one-client row's repeated 40-token prompt is all cached."""
    names = list(servers.urls)
    out: dict[str, list[float]] = {s: [] for s in names}
    cs = {s: client(servers.urls[s], servers.headers[s], 1) for s in names}
    try:
        for i in range(-warm, reps):
            text = FILE[: start + 3 * (i + warm)]
            for s in names if i % 2 == 0 else reversed(names):
                ttft = (await one(cs[s], text, 16, stream=True))[1]
                if i >= 0:
                    out[s].append(ttft)
    finally:
        for c in cs.values():
            await c.aclose()
    return {s: {"p50": statistics.median(v), "ttft": statistics.median(v), "ttfts": v} for s, v in out.items()}


def single_rounds(servers: Servers, how: dict) -> dict[str, dict]:
    """The one-client scenario: `reps` requests of each kind per server, interleaved request by request with
    every other server (`_paired`; until 2026-12-05 it was 4 rounds of one block of 6 per server, and the
    ratio moved +-40 % between runs minutes apart). Each server keeps its per-request lists, so `ratio` takes
    the median (and p25-p75) of the paired ratios; CPU per request is each server's CPU over the whole
    scenario (idle servers use next to none) over its requests."""
    cpu0 = {s: cpu_seconds(p.pid) for s, p in servers.procs.items()}
    if how["kind"] == "typing":
        got = asyncio.run(_typing(servers, how["reps"], how.get("warm", 2), typing_start(how["model"], how["n_ctx"])))
        for s, g in got.items():
            g["cpu_per_request"] = (cpu_seconds(servers.procs[s].pid) - cpu0[s]) / (how["reps"] + how.get("warm", 2))
        return got
    got = asyncio.run(_paired(servers, how["reps"], how.get("warm", 2)))
    return {
        s: {
            "p50": statistics.median(g["lats"]),
            "ttft": statistics.median(g["ttfts"]),
            "lats": g["lats"],
            "ttfts": g["ttfts"],
            "cold": g["cold"],
            "cpu_per_request": (cpu_seconds(servers.procs[s].pid) - cpu0[s]) / (3 * (how["reps"] + how.get("warm", 2))),
        }
        for s, g in got.items()
    }


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median, p25 and p75 of the ratios a[i] / b[i] of requests sent one after the other."""
    q = statistics.quantiles([x / y for x, y in zip(a, b, strict=True)], n=4, method="inclusive")
    return q[1], q[0], q[2]


async def load(url: str, headers: dict, clients: int, tokens: int, per_client: int) -> dict:
    """`clients` concurrent clients, each sending `per_client` requests (distinct prompts) back to back."""
    async with client(url, headers, clients) as c:
        lat: list[float] = []
        toks = 0

        async def worker(k: int) -> None:
            nonlocal toks
            for j in range(per_client):
                # the scenario in the prompt: no request repeats one an earlier scenario sent (llama-server keeps
                # past prompts' KV in RAM, --cache-ram 8 GiB by default, and restored them here; codemoat's
                # slots keep only their last prompt: a prefill one server skipped and the other did not)
                dt, _, n = await one(c, f"# {clients}x{tokens} client {k}, request {j}\n" + PROMPT, tokens)
                lat.append(dt)
                toks += n

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    return {"tok_s": toks / wall, "rps": len(lat) / wall, "p50": statistics.median(lat), "tokens": toks / len(lat), "toks": toks}


async def editor(url: str, headers: dict, clients: int, seconds: float) -> dict:
    """Each client types: every 150 ms (or when the previous answer came, if later) it sends its own file's
    prefix, three characters longer than the last time, for a 16-token completion; prefixes are shared
    request to request, which prompt caching (codemoat's slots, llama-server's cache_prompt) reuses."""
    async with client(url, headers, clients) as c:
        lat: list[float] = []

        async def worker(k: int) -> None:
            text, at, i, end = f"# module {k}\n" + FILE, 600 + 37 * k, 0, time.perf_counter() + seconds
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                lat.append((await one(c, text[: at + 3 * i], 16))[0])
                i += 1
                await asyncio.sleep(max(0.0, 0.15 - (time.perf_counter() - t0)))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    return {"p50": statistics.median(lat), "rps": len(lat) / wall}


def variant(r: int) -> str:
    """FILE*6 (~3,000 tokens) made new for rep `r` on every line, so no cached prefix helps."""
    return (FILE * 6).replace("handler_", f"handler_{r}_").replace("amount_cents", f"cents_{r}")[-12000:]


INFILL_SUFFIX = "\n\ndef tail():\n    pass\n"


async def infill_ttft(c: httpx.AsyncClient, prefix: str) -> tuple[float, int, bool]:
    """(time to first token, prompt tokens the server evaluated, whether it trimmed) of a streamed /infill."""
    body = {"input_prefix": prefix, "input_suffix": INFILL_SUFFIX, "n_predict": 16, "stream": True, "temperature": 0}
    t0, ttft, n, cut = time.perf_counter(), 0.0, 0, False
    async with c.stream("POST", "/infill", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if ev.get("content") and not ttft:
                ttft = time.perf_counter() - t0
            n, cut = ev.get("tokens_evaluated", n), ev.get("truncated", cut)
    return ttft, n, cut


async def infill(url: str, headers: dict, reps: int, model: Path) -> dict:
    """Time to first token of a streamed /infill whose prefix is ~3,000 tokens, more than the slot's
    context, so that the server trims it (keeps the end of the prefix), next to an /infill that already
    fits with a prompt of the same final size (the trimmed request's tail, cut here by the model's own
    tokenizer); every request is new text (a cold cache)."""
    from codemoat.engines.llamacpp import LlamaCppEngine

    vocab = LlamaCppEngine.front(str(model))
    out: dict[str, list] = {"ttft": [], "fit": [], "n": [], "n_fit": []}
    async with client(url, headers, 1) as c:
        for r in range(reps):
            ttft, n, cut = await infill_ttft(c, variant(2 * r))
            ids = vocab.tokenize(variant(2 * r + 1), special=False)
            fixed = len(vocab.tokenize(INFILL_SUFFIX, special=False)) + 8  # BOS, FIM tokens, the suffix; a margin
            fit, n_fit, cut_fit = await infill_ttft(c, vocab.detokenize(ids[-max(1, n - fixed) :]))
            if not cut or cut_fit:
                print(f"/infill: trimmed {cut} ({n} tokens), fitting request trimmed {cut_fit} ({n_fit} tokens)", file=sys.stderr)
            out["ttft"].append(ttft)
            out["fit"].append(fit)
            out["n"].append(n)
            out["n_fit"].append(n_fit)
    vocab.close()
    return {k: statistics.median(v) for k, v in out.items()}


def scenarios(quick: bool, only: list[str] | None = None) -> list[tuple[str, str, dict]]:
    """(key, label, how) in the order run (`only`: these keys, e.g. ["c8_128"])."""
    s = [
        (
            "single",
            "1 client: p50 latency / TTFT, 32 tokens (CPU per request)",
            {"kind": "single", "reps": 20 if quick else 60, "warm": 2},
        ),
        (
            "typing",
            "1 client typing in a ~1,250-token file (3 more characters a request): TTFT, 16 tokens (CPU per request)",
            {"kind": "typing", "reps": 20 if quick else 60, "warm": 2},
        ),
        ("c8_32", "8 clients, 32 tokens: tokens/s", {"kind": "load", "clients": 8, "tokens": 32, "per": 2 if quick else 4}),
        ("c8_128", "8 clients, 128 tokens: tokens/s", {"kind": "load", "clients": 8, "tokens": 128, "per": 1 if quick else 2}),
        ("c32_32", "32 clients, 32 tokens: tokens/s", {"kind": "load", "clients": 32, "tokens": 32, "per": 1 if quick else 2}),
        ("c32_128", "32 clients, 128 tokens: tokens/s", {"kind": "load", "clients": 32, "tokens": 128, "per": 1}),
        (
            "editor",
            "editor mix, 8 clients every 150 ms: p50 latency",
            {"kind": "editor", "clients": 8, "seconds": 5 if quick else 10},
        ),
        (
            "infill",
            "/infill of ~3,000 tokens, trimmed / one that fits, same final size: TTFT",
            {"kind": "infill", "reps": 2 if quick else 4},
        ),
    ]
    if quick:
        s = [x for x in s if x[0] not in ("c32_128",)]
    if only:
        s = [x for x in s if x[0] in only]
    return s


def run_one(url: str, headers: dict, how: dict) -> dict:
    k = how["kind"]
    if k == "single":
        return asyncio.run(single(url, headers, how["reps"]))
    if k == "load":
        return asyncio.run(load(url, headers, how["clients"], how["tokens"], how["per"]))
    if k == "editor":
        return asyncio.run(editor(url, headers, how["clients"], how["seconds"]))
    return asyncio.run(infill(url, headers, how["reps"], how["model"]))


def fmt(key: str, r: dict | None) -> str:
    if r is None:
        return "—"
    if key == "single":
        cpu = f" ({r['cpu_per_request'] * 1000:.1f} ms CPU/request)" if r.get("cpu_per_request") else ""
        return f"{r['p50'] * 1000:.1f} / {r['ttft'] * 1000:.1f} ms{cpu}"
    if key == "typing":
        cpu = f" ({r['cpu_per_request'] * 1000:.1f} ms CPU/request)" if r.get("cpu_per_request") else ""
        return f"{r['ttft'] * 1000:.1f} ms{cpu}"
    if key.startswith("c"):
        per_cpu = f", {r['toks'] / r['cpu']:.0f} tok/CPU-s" if r.get("cpu") else ""
        return f"{r['tok_s']:.0f} tok/s{per_cpu} (p50 {r['p50'] * 1000:.0f} ms, {r['tokens']:.0f} tok/answer)"
    if key == "editor":
        return f"{r['p50'] * 1000:.1f} ms ({r['rps']:.1f} req/s)"
    return (
        f"{r['ttft'] * 1000:.0f} / {r['fit'] * 1000:.0f} ms = {r['ttft'] / r['fit']:.2f}× "
        f"({r['n']:.0f} / {r['n_fit']:.0f} prompt tokens)"
    )


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process `pid` and every process under it, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(d.name)] = (int(f[1]), (int(f[11]) + int(f[12])) / tick)  # ppid, utime + stime
    tree, total = {pid}, 0.0
    for _ in range(8):  # a few generations deep
        tree |= {p for p, (pp, _) in stats.items() if pp in tree}
    for p in tree:
        total += stats.get(p, (0, 0.0))[1]
    return total


def metric(key: str, r: dict) -> tuple[float, bool]:
    """The number a ratio is taken of, and whether higher is better."""
    if key.startswith("c"):
        return r["tok_s"], True
    if key == "infill":
        return r["ttft"], False
    return r["p50"], False


def bench_model(name: str, args: argparse.Namespace, token: str, env: dict) -> str:
    model = model_path(name)
    variants = {BASE: {"PYTHONPATH": args.baseline, "CODEMOAT_MODEL__PARALLEL": str(args.parallel)}} if args.baseline else None
    servers = Servers(model, args, token, env, variants)
    res: dict[str, dict[str, dict]] = {s: {} for s in servers.procs}
    try:
        for s, u in servers.urls.items():  # warm-up: load pages, caches, first-call costs
            try:
                asyncio.run(single(u, servers.headers[s], 2))
            except httpx.HTTPError as e:  # reported in its cells ("—") and here
                print(f"{name} warm-up {s}: {type(e).__name__} {e} (exit {servers.procs[s].poll()})", file=sys.stderr)
        for i, (key, label, how) in enumerate(scenarios(args.quick, args.scenarios)):
            if key in ("single", "typing"):  # interleaved request by request (`single_rounds`)
                try:
                    for s, r in single_rounds(servers, dict(how, model=model, n_ctx=args.n_ctx)).items():
                        res[s][key] = r
                except httpx.HTTPError as e:
                    print(f"{name} {key}: {type(e).__name__} {e}", file=sys.stderr)
                for s in servers.urls:
                    print(f"{name:10s} {key:8s} {s:17s} {fmt(key, res[s].get(key))}", flush=True)
                continue
            order = list(servers.urls) if i % 2 == 0 else list(reversed(servers.urls))
            for s in order:
                try:
                    cpu0 = cpu_seconds(servers.procs[s].pid)
                    res[s][key] = run_one(servers.urls[s], servers.headers[s], dict(how, model=model))
                    res[s][key]["cpu"] = cpu_seconds(servers.procs[s].pid) - cpu0
                except httpx.HTTPError as e:
                    print(f"{name} {key} {s}: {type(e).__name__} {e}", file=sys.stderr)
                print(f"{name:10s} {key:8s} {s:17s} {fmt(key, res[s].get(key))}", flush=True)
    finally:
        servers.stop()
    kernels = (
        "llama.cpp's default CPU buffer types for every server"
        if servers.cpu.use_extra_bufts
        else "llama.cpp's safe CPU kernels for every server (codemoat's self-test; `llama-server --no-repack`)"
    )
    return f"{table(name, model, res, args)}\n\nCPU kernels: {kernels}: {servers.cpu.reason}."


def ratio(res: dict, key: str, a: str, b: str) -> str:
    ra, rb = res.get(a, {}).get(key), res.get(b, {}).get(key)
    if not ra or not rb:
        return "—"
    if key == "single":  # and CPU per request in brackets: what the load did not move
        cpu = (
            f" ({ra['cpu_per_request'] / rb['cpu_per_request']:.2f})"
            if ra.get("cpu_per_request") and rb.get("cpu_per_request")
            else ""
        )
        if len(ra.get("ttfts", ())) != len(rb.get("ttfts", ())) or not ra.get("lats"):
            return f"{ra['p50'] / rb['p50']:.2f} / {ra['ttft'] / rb['ttft']:.2f}{cpu}"
        (lm, l25, l75), (tm, t25, t75) = paired(ra["lats"], rb["lats"]), paired(ra["ttfts"], rb["ttfts"])
        return f"{lm:.2f} [{l25:.2f}–{l75:.2f}] / {tm:.2f} [{t25:.2f}–{t75:.2f}]{cpu}"
    if key == "typing":  # paired, as the one-client row's, and CPU per request in brackets
        cpu = (
            f" ({ra['cpu_per_request'] / rb['cpu_per_request']:.2f})"
            if ra.get("cpu_per_request") and rb.get("cpu_per_request")
            else ""
        )
        if len(ra["ttfts"]) != len(rb["ttfts"]):
            return f"{ra['ttft'] / rb['ttft']:.2f}{cpu}"
        m, q1, q3 = paired(ra["ttfts"], rb["ttfts"])
        return f"{m:.2f} [{q1:.2f}–{q3:.2f}]{cpu}"
    va, _ = metric(key, ra)
    vb, _ = metric(key, rb)
    if key.startswith("c") and ra.get("cpu") and rb.get("cpu"):  # and per CPU-second: what the load did not move
        return f"{va / vb:.2f} ({(ra['toks'] / ra['cpu']) / (rb['toks'] / rb['cpu']):.2f})"
    return f"{va / vb:.2f}"


def cold_row(res: dict, cols: list[str], pairs: list[tuple[str, str]]) -> str:
    """The one-client row's first streamed request of each turn, right after the other servers' turns."""
    cold = {s: res[s].get("single", {}).get("cold") for s in cols}
    cells = [f"{statistics.median(cold[s]) * 1000:.1f} ms" if cold[s] else "—" for s in cols]
    for a, b in pairs:
        if cold.get(a) and cold.get(b) and len(cold[a]) == len(cold[b]):
            m, q1, q3 = paired(cold[a], cold[b])
            cells.append(f"{m:.2f} [{q1:.2f}–{q3:.2f}]")
        else:
            cells.append("—")
    return "| 1 client: TTFT of the first request after another server's (caches cold) | " + " | ".join(cells) + " |"


def table(name: str, model: Path, res: dict, args: argparse.Namespace) -> str:
    cols = [s for s in (*SERVERS, ONE_SLOT, INLINE, BASE) if s in res]
    pairs = [
        ("codemoat", b) for b in ["llama-server", "codemoat-1", "llama_cpp.server"] + [s for s in (ONE_SLOT, BASE) if s in res]
    ]
    if ONE_SLOT in res:  # what batching gains on the reference itself
        pairs.append(("llama-server", ONE_SLOT))
    if INLINE in res:  # the engine in the server's process: what the engine process's isolation costs
        pairs.append((INLINE, "llama-server"))
    head = "| scenario | " + " | ".join(cols) + " | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |"
    lines = [head, "|" + " --- |" * (len(cols) + len(pairs) + 1)]
    for key, label, _ in scenarios(args.quick, args.scenarios):
        cells = [fmt(key, res[s].get(key)) for s in cols] + [ratio(res, key, a, b) for a, b in pairs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if key == "single" and any(res[s].get(key, {}).get("cold") for s in cols):
            lines.append(cold_row(res, cols, pairs))
    size = model.stat().st_size / 1e6
    return f"### {name}: `{model.name}` ({size:.1f} MB)\n\n" + "\n".join(lines) + "\n"


def merge(old: str, parts: dict[str, str], header: str) -> str:
    """`old` (the results file) with the `### <model>:` section of each model run here replaced, or added
    after the last model section; every other section (targets, notes, other benches' sections) and the
    text before the first model section stay as they were. No file yet: `header`, then the sections."""
    if not old.strip():
        return header + "\n" + "\n".join(parts.values())
    sections = [
        (h[4:].split(":", 1)[0].strip() if h and h.startswith("### ") and ":" in h else None, text) for h, text in cut(old, 3)
    ]
    todo = dict(parts)
    out = [parts[n].rstrip("\n") + "\n\n" if n in parts and todo.pop(n, None) else text for n, text in sections]
    if todo:  # new models: after the last model section (else at the end)
        last = max((i for i, (n, _) in enumerate(sections) if n is not None), default=len(sections) - 1)
        out[last + 1 : last + 1] = [t.rstrip("\n") + "\n\n" for t in todo.values()]
    return "".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--models", default="bundled", help="comma-separated: bundled, random100m, random100m-f16, gemma, or a GGUF path"
    )
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument(
        "--threads", type=int, default=1, help="per server (on a loaded 2-core machine 2 threads spin on llama.cpp's barriers)"
    )
    ap.add_argument("--parallel", type=int, default=8, help="slots of codemoat and llama-server")
    ap.add_argument("--n-ctx", type=int, default=2048, help="context per slot")
    ap.add_argument("--quick", action="store_true", help="fewer requests per scenario and no 32×128 row (larger models)")
    ap.add_argument(
        "--scenarios",
        help="comma-separated keys to run only those rows: single, typing, c8_32, c8_128, c32_32, c32_128, editor, infill "
        "(with --out elsewhere: a model's section of the results file is replaced whole)",
    )
    ap.add_argument("--build", action="store_true", help="build llama-server first (once; cached)")
    ap.add_argument(
        "--baseline",
        help="src/ folder of another codemoat checkout (e.g. `git archive HEAD src | tar -x -C /tmp/base`): "
        f"run as the {BASE} column (batched, same settings) to measure a change side by side",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.md"))
    args = ap.parse_args()
    args.servers = [s for s in args.servers.split(",") if s] + ([BASE] if args.baseline else [])
    args.scenarios = [s for s in (args.scenarios or "").split(",") if s] or None
    if args.build:
        build_llama_server()
    env = dict(os.environ)
    token = "bench-" + os.urandom(12).hex()  # the references' API key
    cmd = " ".join(["bench/serve.py", *sys.argv[1:]])
    parts = {}
    for m in [m for m in args.models.split(",") if m]:
        load_before, t0 = open("/proc/loadavg").read().split()[:3], time.time()
        table_md = bench_model(m, args, token, env)
        load_after = open("/proc/loadavg").read().split()[:3]
        head, _, rest = table_md.partition("\n\n")
        parts[m] = (
            f"{head}\n\nMeasured by `.venv/bin/python {cmd}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t0))}, "
            f"{time.time() - t0:.0f} s, {os.cpu_count()} CPU cores shared with other work, load average (1/5/15 min) "
            f"{' '.join(load_before)} before, {' '.join(load_after)} after; {args.threads} thread(s) per server, "
            f"codemoat at commit {commit()}.\n\n{rest}"
        )
    header = f"""# Serving under load: codemoat vs llama.cpp's `llama-server`

Measured by `bench/serve.py` (each model's section says when, with what load): servers take turns per
scenario, and ratios are the result.
Every server: the same GGUF, {args.threads} threads, {args.n_ctx} tokens of context per slot; codemoat with
model.parallel = {args.parallel} (batched, the default engine) and = 1 (one request at a time); `llama-server -np
{args.parallel} -cb -fa off` built from the llama.cpp that llama-cpp-python 0.3.36 vendors (same commit as the engine);
llama-cpp-python's `llama_cpp.server` (one sequence). Greedy completions of fixed length; codemoat's path
includes bearer-token authentication, the audit record and usage facts of every request; the references
check a fixed API key and keep no records. A cell "1 client" is p50 latency / time to first token of
60 whole and 60 streamed requests per server, sent request by request in turn with the other servers; its
ratio is the median of the 60 paired ratios (request i of one server over request i of the other), p25–p75
in square brackets (until 2026-12-05: 24 requests of each kind in blocks of 6 per server, the ratio of the
medians). Ratios below 1 are better for latency and time to first token, above 1 for tokens/s. Load rows also
give tokens per CPU-second (user + system time of the server's processes, read from /proc around the
scenario), and their ratios that one in brackets: other work on the machine stretches wall-clock time
but hardly the CPU time a server needs for the same tokens. The /infill row sends ~3,000 tokens that
the server must trim to its slot, then an /infill that already fits with a prompt of the same final
size (cut by the model's tokenizer), each new text: time to first token of both, and their ratio.

"""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(merge(out.read_text() if out.is_file() else "", parts, header))
    print("\n".join(parts.values()))


if __name__ == "__main__":
    main()
