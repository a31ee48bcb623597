"""Which llama.cpp CPU configuration is correct on this machine: extra buffer types, or the safe path.

llama.cpp's CPU backend can hold quantised weights in "extra buffer types": AMX tiles on Intel
Xeons with `amx_int8` (Sapphire/Emerald Rapids and later) and repacked, interleaved layouts for
the AVX2/AVX-512 kernels ("CPU_REPACK"). With llama-cpp-python 0.3.36 built `-march=native` by
GCC 12 on an AMX Xeon, every quantised model dies with SIGILL in its first multi-token `llama_decode`
with them on: the compiler drops the tile shapes llama.cpp loads with `ldtilecfg`, measured on an
Emerald Rapids guest (docs/llamacpp-amx.md).
`llama_model_params.use_extra_bufts = False` keeps weights in plain CPU buffers: correct on every
x86-64 CPU, slower where repacking helps (bench/results/engines.md).

    choice = choose("auto", model_path)   # Choice(use_extra_bufts=..., reason=...)

"extra" and "safe" are taken as told. "auto": a model without quantised tensors needs no test
(llama.cpp's default); otherwise a verdict cached per (llama.cpp build, CPU) under
$CODEMOAT_HOME, or the self-test: a child process builds a small llama (hidden 512, rows that
suit AMX tiles and K-quants), quantises it to Q4_0, Q8_0 and Q4_K_M, decodes greedily on the
safe path, then feeds the same tokens with extra buffer types on. A crash (signal), a hang past
the timeout, or logits that disagree mean "unsafe here": the engine serves on the safe path and
one log line names the CPU feature.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..cores import usable_cores

log = logging.getLogger("codemoat.engines")

#: bump when the test changes, so verdicts cached by an older test are not trusted
SELFTEST_VERSION = 1
#: (name, llama_ftype): the types whose x86 kernels have AMX or repacked variants
QUANTS = (("Q4_0", 2), ("Q8_0", 7), ("Q4_K_M", 15))
#: test hook, read by the child only: "segv" (raise SIGSEGV before the extra decode), "hang", "mismatch"
#: (the safe path's logits reversed stand in for the extra decode's)
FAULT_ENV = "CODEMOAT_CPU_SELFTEST_FAULT"
TIMEOUT_S = 120.0
CACHE_FILE = "cpu-verdicts.json"
_FLOAT_TYPES = {0, 1, 24, 25, 26, 27, 28, 30}  # GGML types F32, F16, I8..I64, F64, BF16: nothing to repack
_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class Choice:
    """Whether llama.cpp may use its extra CPU buffer types, and why (shown on /health)."""

    use_extra_bufts: bool
    reason: str

    def health(self) -> dict:
        return {"path": "extra" if self.use_extra_bufts else "safe", "reason": self.reason}


# -- facts about this machine ---------------------------------------------------
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("unknown", {}) where there is none."""
    name, flags = "unknown", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return name, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name == "unknown":
            name = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if name != "unknown" and flags:
            break
    return name, flags


def system_info() -> str:
    """llama.cpp's own view of the CPU backend (`AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 | ...`)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def feature(flags: frozenset[str], sysinfo: str) -> str:
    """The CPU feature behind llama.cpp's extra buffer types here, for the log line."""
    if "AMX_INT8 = 1" in sysinfo or "amx_int8" in flags:
        return "amx_int8" if "amx_int8" in flags else "AMX_INT8"
    for f in ("avx512_vnni", "avx512f", "avx_vnni", "avx2"):
        if f in flags:
            return f"repacked kernels on {f}"
    return "repacked kernels"


def build_id() -> str:
    """What identifies this llama.cpp build: version, system info, and the shared library's size and mtime."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    stamp = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in lib.glob("*.so*")) if lib.is_dir() else []
    return json.dumps([llama_cpp.__version__, system_info(), stamp])


def cache_key() -> str:
    name, flags = cpu_info()
    raw = json.dumps([SELFTEST_VERSION, build_id(), name, sorted(flags)])
    return hashlib.sha256(raw.encode()).hexdigest()


def is_quantised(path: str | os.PathLike) -> bool:
    """Whether a GGUF file holds any quantised tensor, read from its header. A file that is not a GGUF
    (or cannot be opened) is not: llama.cpp refuses it. A GGUF header that cannot be parsed is: the
    self-test is the cautious answer."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
            f.seek(0)
            return any(t not in _FLOAT_TYPES for t in _tensor_types(f))
    except OSError:
        return False
    except (ValueError, struct.error):
        return True


def _tensor_types(f) -> list[int]:
    """GGML type of every tensor in a GGUF v2/v3 header (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)."""
    import io

    f = io.BufferedReader(f, 1 << 20) if not isinstance(f, io.BufferedReader) else f

    def u(fmt: str):
        return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip_value(vtype: int) -> None:
        if vtype in sizes:
            f.seek(sizes[vtype], 1)
        elif vtype == 8:
            f.seek(u("Q"), 1)
        elif vtype == 9:
            item, n = u("I"), u("Q")
            if item in sizes:
                f.seek(sizes[item] * n, 1)
            else:
                for _ in range(n):
                    skip_value(item)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")

    if f.read(4) != b"GGUF" or u("I") not in (2, 3):
        raise ValueError("not a GGUF v2/v3 file")
    n_tensors, n_kv = u("Q"), u("Q")
    for _ in range(n_kv):
        f.seek(u("Q"), 1)  # key
        skip_value(u("I"))
    types = []
    for _ in range(n_tensors):
        f.seek(u("Q"), 1)  # name
        f.seek(8 * u("I"), 1)  # dims
        types.append(u("I"))
        f.seek(8, 1)  # offset
    return types


# -- loading with or without extra buffer types ----------------------------------
@contextlib.contextmanager
def extra_bufts(on: bool, progress=None):
    """Make `llama_cpp.Llama(...)` load with `use_extra_bufts = on` (and llama.cpp's load progress
    callback `progress`, a `llama_cpp.llama_progress_callback`, when given: `engines.overlap`).

    llama-cpp-python 0.3.36 has the field in `llama_model_params` but no constructor argument for it
    (unknown keywords are swallowed by `**kwargs`); `Llama.__init__` takes its model params from
    `llama_model_default_params()`, so that is wrapped for the duration of one load, under a lock.
    """
    import llama_cpp.llama_cpp as lib

    with _LOAD_LOCK:
        default = lib.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = on
            if progress is not None:
                p.progress_callback = progress
            return p

        lib.llama_model_default_params = params
        try:
            yield
        finally:
            lib.llama_model_default_params = default


# -- the verdict ------------------------------------------------------------------
def _cache_path() -> Path:
    from ..paths import home

    return home() / CACHE_FILE


def _read_cache(path: Path) -> dict:
    """The cache's entries; {} when missing, damaged, or not a regular file of its own (a FIFO put there
    would block the read for good, a link would redirect it)."""
    from ..paths import read_own

    try:
        data = json.loads(read_own(path, "CPU self-test cache", error=OSError))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached(key: str) -> Choice | None:
    try:
        entry = _read_cache(_cache_path()).get(key)
        return Choice(bool(entry["use_extra_bufts"]), str(entry["reason"])) if entry else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def remember(key: str, choice: Choice) -> None:
    """Store the verdict (0600); a cache that cannot be written only costs the next start a test."""
    path = _cache_path()
    data = _read_cache(path)
    data[key] = {**asdict(choice), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot cache the CPU self-test verdict in %s: %s", path, e.strerror or e)


def choose(
    setting: str = "auto",
    model_path: str | os.PathLike | None = None,
    *,
    n_threads: int | None = None,
    timeout: float = TIMEOUT_S,
) -> Choice:
    """The CPU configuration to load `model_path` with, for `model.cpu_buffers = setting`."""
    if setting == "extra":
        return Choice(True, "model.cpu_buffers = extra")
    if setting == "safe":
        return Choice(False, "model.cpu_buffers = safe")
    if setting != "auto":
        from ..errors import CodemoatError

        raise CodemoatError(f"model.cpu_buffers must be auto, extra or safe, not {setting!r}")
    if model_path is not None and not is_quantised(model_path):
        return Choice(True, "no quantised tensors in the model: llama.cpp's default CPU buffers")
    key = cache_key()
    hit = cached(key)
    if hit is not None:
        return hit
    choice = selftest(n_threads=n_threads, timeout=timeout)
    remember(key, choice)
    return choice


def selftest(*, n_threads: int | None = None, timeout: float = TIMEOUT_S) -> Choice:
    """Run the self-test in a child process; a crash, hang or mismatch there picks the safe path (one log line)."""
    name, flags = cpu_info()
    feat = feature(flags, system_info())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="codemoat-cpu-") as tmp:
        cmd = [sys.executable, "-m", "codemoat.engines.cpu", tmp, str(n_threads or usable_cores())]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
            out, rc = r.stdout, r.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc = None
    lines = [json.loads(x[len("selftest ") :]) for x in out.splitlines() if x.startswith("selftest ")]
    begun = [x for x in lines if x.get("begin")]
    quant = begun[-1]["quant"] if begun else "Q4_0"
    done = lines[-1] if lines and "ok" in lines[-1] else None
    if rc is None:
        why = f"hung for more than {timeout:.0f} s in a {quant} decode"
    elif rc < 0:
        why = f"crashed a {quant} decode with {_signame(-rc)}"
    elif done is not None and not done["ok"]:
        why = done["why"]
    elif rc != 0 or done is None:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1][:200]
        why = f"self-test failed to run (exit {rc}: {tail})"
    else:
        ms = (time.perf_counter() - t0) * 1000
        log.info(
            "llama.cpp's extra CPU buffer types passed the self-test on this CPU (%s; %s, %.0f ms): serving with them",
            name,
            feat,
            ms,
        )
        return Choice(True, f"self-test passed on this CPU ({feat}): Q4_0, Q8_0 and Q4_K_M decodes match the safe path")
    reason = f"llama.cpp's extra CPU buffer types (AMX/repack) {why} on this CPU ({feat}): serving on the safe path"
    log.warning("%s", reason)
    return Choice(False, reason)


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


# -- the child ----------------------------------------------------------------------
def _say(**kw) -> None:
    print("selftest " + json.dumps(kw), flush=True)


def _decode(path: str, extra: bool, n_threads: int, forced: list[int] | None, n_new: int = 8):
    """Greedy decode (or, given `forced`, teacher-forced): the prompt as one batch, then one token at a
    time. The batch matters: llama.cpp's AMX matmul runs its tile kernels only for two tokens or more
    (one token takes an AVX512-VNNI kernel), and those are what crash (docs/llamacpp-amx.md)."""
    import llama_cpp
    import numpy as np

    with extra_bufts(extra):
        llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, n_threads=n_threads, verbose=False)
    prompt = [5, 17, 42, 99, 123, 200, 255, 301]
    n_vocab = llm.n_vocab()
    rows, toks = [], []
    llm.eval(prompt)
    for i in range(n_new):
        row = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).astype(np.float64)
        rows.append(row)
        tok = forced[i] if forced is not None else int(row.argmax())
        toks.append(tok)
        llm.eval([tok])
    llm.close()
    return np.stack(rows), toks


def _agree(safe, extra) -> str | None:
    """Why two logit matrices disagree, or None: each step's cosine ≥ 0.99 and the same argmax
    unless the safe path's top two are within 1% of its logit range (a tie either kernel may break)."""
    import numpy as np

    for i, (s, e) in enumerate(zip(safe, extra)):
        if not np.all(np.isfinite(e)):
            return f"gave non-finite logits at step {i}"
        cos = float(s @ e / (np.linalg.norm(s) * np.linalg.norm(e) + 1e-12))
        if cos < 0.99:
            return f"gave logits unlike the safe path's at step {i} (cosine {cos:.3f})"
        a, b = int(s.argmax()), int(e.argmax())
        if a != b and s[a] - s[b] > 0.01 * (s.max() - s.min()):
            return f"chose token {b} where the safe path chose {a} at step {i}"
    return None


def selftest_model(folder: Path) -> Path:
    """The self-test's F32 llama: rows of 512 and 1536, which llama.cpp's AMX buffer type and the
    K-quants take (its quantised matrices load into the AMX buffer on an AMX Xeon)."""
    from .tinyllama import build_random_llama

    return build_random_llama(Path(folder) / "f32.gguf", n_embd=512, n_ff=1536, n_layer=2, n_head=4)


def _child(tmp: str, n_threads: int) -> int:
    import ctypes

    import llama_cpp

    src = selftest_model(Path(tmp))
    fault = os.environ.get(FAULT_ENV, "")
    for name, ftype in QUANTS:
        dst = Path(tmp) / f"{name}.gguf"
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = ftype
        p.nthread = n_threads
        if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) != 0:
            _say(ok=False, why=f"could not quantise the test model to {name}")
            return 0
        safe, toks = _decode(str(dst), False, n_threads, None)
        _say(begin=True, quant=name)
        if fault == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if fault == "hang":
            time.sleep(3600)
        if fault == "mismatch":  # the safe logits reversed: no real extra decode, which crashes on some CPUs
            extra = safe[:, ::-1].copy()
        else:
            extra, _ = _decode(str(dst), True, n_threads, toks)
        why = _agree(safe, extra)
        if why:
            _say(ok=False, why=f"{why} of a {name} decode")
            return 0
    _say(ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], int(sys.argv[2])))
