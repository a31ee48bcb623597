"""llama.cpp's CPU paths side by side: tokens/s with the extra buffer types (AMX, repacked kernels) on
and off, per quantisation, in one run. This is what `model.cpu_buffers = auto` chooses between
(src/codemoat/engines/cpu.py); the table says what the safe path costs where the self-test fails.

Models: the bundled model and a random llama with real dimensions (hidden 1024, FFN 2816, 2 layers),
each as F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0 (quantised by llama.cpp here), and the pretrained
Gemma 3 270M Q4_K_M (bench/gemma.py installs it into the bench's scratch venv when missing).
Each model runs in its own child process with both paths loaded side by side, so that a crash (the AMX
bug) is a table cell, not the end of the bench (the safe path is then measured again alone). Per path:
one warm-up, then the median of --reps rounds of a 128-token prompt evaluated as one batch and 32 tokens
generated greedily one at a time; in each round both paths run, the order alternating.

    .venv/bin/python bench/engines.py [--reps 5] [--threads 1] [--no-gemma]

Writes bench/results/engines.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results" / "engines.md"
BUNDLED = ROOT / "models" / "codemoat-tiny.gguf"
QUANTS = {"F16": None, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "Q4_0": 2}
N_PROMPT, N_GEN = 128, 32


# -- the child: one model, both paths, alternating -----------------------------------
def load(path: str, extra: bool, n_threads: int):
    """A `Llama` with `use_extra_bufts = extra`, and the buffer types llama.cpp's load log names."""
    import llama_cpp

    from codemoat.engines.cpu import extra_bufts

    log = tempfile.TemporaryFile(mode="w+")
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
        with extra_bufts(extra):
            llm = llama_cpp.Llama(
                model_path=path,
                n_ctx=N_PROMPT + N_GEN + 8,
                n_batch=N_PROMPT,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                verbose=True,
            )
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    log.seek(0)
    pat = r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB"
    return llm, {m.group(1): float(m.group(2)) for m in re.finditer(pat, log.read())}


def measure(path: str, paths: list[bool], reps: int, n_threads: int) -> dict:
    """Both paths loaded side by side; each round runs one after the other, the order alternating."""
    import numpy as np

    loaded = {extra: load(path, extra, n_threads) for extra in paths}
    n_vocab = loaded[paths[0]][0].n_vocab()
    prompt = [(i * 7919) % (n_vocab - 1) + 1 for i in range(N_PROMPT)]

    def one(llm) -> tuple[float, float]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        pp = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(N_GEN):
            row = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
            llm.eval([int(row.argmax())])
        return N_PROMPT / pp, N_GEN / (time.perf_counter() - t)

    runs: dict[bool, list] = {extra: [] for extra in paths}
    for extra in paths:
        one(loaded[extra][0])  # warm-up
    for r in range(reps):
        for extra in paths if r % 2 == 0 else paths[::-1]:
            runs[extra].append(one(loaded[extra][0]))
    out = {}
    for extra in paths:
        loaded[extra][0].close()
        out["on" if extra else "off"] = {
            "pp": statistics.median(x[0] for x in runs[extra]),
            "tg": statistics.median(x[1] for x in runs[extra]),
            "buffers": loaded[extra][1],
        }
    return out


def run_child(path: Path, paths: list[bool], reps: int, n_threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), ",".join("1" if p else "0" for p in paths), str(reps), str(n_threads)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"error": "hung (600 s)"}
    if r.returncode < 0:
        return {"error": f"crashed ({signal.Signals(-r.returncode).name})"}
    if r.returncode != 0:
        return {"error": f"failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:120]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def both(path: Path, reps: int, n_threads: int) -> tuple[dict, dict]:
    """(on, off) cells; when the child dies (the AMX bug), "off" is measured again on its own."""
    r = run_child(path, [True, False], reps, n_threads)
    if "error" not in r:
        return r["on"], r["off"]
    off = run_child(path, [False], reps, n_threads)
    return r, off.get("off", off)


# -- the parent -------------------------------------------------------------------------
def quantise(src: Path, dst: Path, ftype: int) -> Path:
    import ctypes

    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.allow_requantize = True
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # a line per tensor from C
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    if rc != 0:
        raise SystemExit(f"quantising {src.name} (ftype {ftype}) failed")
    return dst


def tensor_types(path: Path) -> str:
    import gguf

    counts = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) > 1)
    return ", ".join(f"{n} {k}" for k, n in counts.most_common())


def fmt(cell: dict, key: str) -> str:
    return cell.get("error") or f"{cell[key]:,.0f}"


def extra_buffers(cell: dict) -> str:
    b = {k: v for k, v in cell.get("buffers", {}).items() if k not in ("CPU", "CPU_Mapped")}
    return ", ".join(f"{k} {v:.1f} MiB" for k, v in b.items()) or "none"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1: steadier on a shared machine)")
    ap.add_argument("--no-gemma", action="store_true", help="skip the Gemma 3 270M rows")
    a = ap.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from tinymodel import build_tiny_gguf

    from codemoat.engines import cpu

    t0 = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="codemoat-bench-engines-"))
    wide = build_tiny_gguf(scratch / "wide-f16.gguf", n_embd=1024, n_ff=2816, n_head=16, n_layer=2, dtype="F16", seed=3)
    models: list[tuple[str, str, Path]] = []
    for label, src in (("bundled (hidden 192, 5 layers)", BUNDLED), ("random llama (hidden 1024, 2 layers)", wide)):
        for q, ftype in QUANTS.items():
            models.append((label, q, src if ftype is None else quantise(src, scratch / f"{src.stem}-{q}.gguf", ftype)))
    gemma_note = ""
    if not a.no_gemma:
        from gemma import TERMS, gemma_path

        models.append(("Gemma 3 270M (pretrained)", "Q4_K_M", gemma_path()))
        gemma_note = TERMS

    rows = []
    for label, q, path in models:
        on, off = both(path, a.reps, a.threads)
        rows.append((label, q, tensor_types(path), on, off))
        print(
            f"{label:38} {q:7} pp {fmt(on, 'pp'):>8} / {fmt(off, 'pp'):>8}   tg {fmt(on, 'tg'):>8} / {fmt(off, 'tg'):>8}",
            flush=True,
        )

    name, flags = cpu.cpu_info()
    choice = cpu.selftest()
    lines = [
        "# llama.cpp CPU paths: extra buffer types (AMX / repacked kernels) on vs off",
        "",
        f"`.venv/bin/python bench/engines.py --reps {a.reps} --threads {a.threads}`: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{name}, {os.cpu_count()} cores, {a.threads} threads, load average {os.getloadavg()[0]:.1f} at the end "
        f"(the machine is shared: read ratios within a row, not across runs), Python {platform.python_version()}.",
        "",
        f"llama.cpp: {cpu.system_info()}",
        f"AMX flags on this CPU: {', '.join(sorted(f for f in flags if f.startswith('amx'))) or 'none'}.",
        f"Self-test here: {'extra' if choice.use_extra_bufts else 'safe'} ({choice.reason}).",
        "",
        f"Tokens/s, median of {a.reps} alternating rounds, both paths loaded side by side in one process per model: prompt processing (pp, "
        f"{N_PROMPT} tokens as one batch) and generation (tg, {N_GEN} tokens one at a time, greedy). "
        '"on" = `use_extra_bufts` true (llama.cpp\'s default), "off" = the safe path.',
        "",
        "| model | type | matrices really stored as | pp on | pp off | pp on/off | tg on | tg off | tg on/off | extra buffers (on) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, q, types, on, off in rows:
        ratio = lambda k: f"{on[k] / off[k]:.2f}x" if "error" not in on and "error" not in off else "-"
        lines.append(
            f"| {label} | {q} | {types} | {fmt(on, 'pp')} | {fmt(off, 'pp')} | {ratio('pp')} | "
            f"{fmt(on, 'tg')} | {fmt(off, 'tg')} | {ratio('tg')} | {extra_buffers(on)} |"
        )
    same = [
        on[k] / off[k]
        for _, _, _, on, off in rows
        for k in ("pp", "tg")
        if "error" not in on and "error" not in off and extra_buffers(on) == "none"
    ]
    floor = (
        f" Rows whose weights took no extra buffer run identical code on both sides: their on/off ratios "
        f"({min(same):.2f}x to {max(same):.2f}x in this run) are the noise floor."
        if same
        else ""
    )
    lines += [
        "",
        "Reading it: where the extra buffer types hold weights (CPU_REPACK on AVX2/AVX-512, AMX on Xeons with "
        'amx_int8), "on" runs the interleaved kernels; elsewhere both columns run the same code and differ by noise. '
        "The bundled model's rows (192) are not multiples of 256, so its K-quant files are mostly llama.cpp's "
        'fallbacks (Q5_0, Q5_1, Q8_0). `model.cpu_buffers = auto` keeps "on" wherever the self-test passes and '
        'takes "off" where it fails (docs/llamacpp-amx.md).' + floor,
        "",
        f"Total bench time {time.time() - t0:.0f} s.",
    ]
    if gemma_note:
        lines += ["", "## Model terms", "", gemma_note]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], [x == "1" for x in sys.argv[3].split(",")], int(sys.argv[4]), int(sys.argv[5]))))
    else:
        main()
