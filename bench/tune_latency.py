"""Where the serving overhead of a LoRA adapter comes from, and what folding it in saves (llama.cpp,
side by side in one run).

    .venv/bin/python bench/tune_latency.py [--model models/codemoat-tiny.gguf | --model gemma] [--rounds 12]

Random rank-r adapters (the GGUF layout `codemoat tune` writes) on every linear layer, on attention
only, and on q/v only, applied by llama.cpp at run time; and the first one folded into its own copy
of the weights (`model.fold_adapters`, engines/merge.py) where the base's types allow. Each round
asks every variant for 16 greedy tokens after a fresh 600-character prompt (a different one each
round, so no prefix cache helps anyone), in rotating order, on the batched engine (`--parallel`
slots, as served). A second part asks one prompt twice in a row with the same run-time adapter
against adapter, base, adapter (the slot's cells survive the switch and are reused under the same
adapter). `--model gemma` is the real Gemma 3 270M Q4_K_M (bench/gemma.py). Appends to
bench/results/tune.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "all 7 linear layers": ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
    "attention (q, k, v, o)": ("attn_q", "attn_k", "attn_v", "attn_output"),
    "q and v": ("attn_q", "attn_v"),
}


def lora(base: Path, targets: tuple[str, ...], rank: int) -> bytes:
    import gguf

    r = gguf.GGUFReader(str(base))
    arch = bytes(r.fields["general.architecture"].parts[r.fields["general.architecture"].data[0]]).decode()
    rng = np.random.default_rng(0)
    fd = os.memfd_create("lora")
    try:
        w = gguf.GGUFWriter(f"/proc/self/fd/{fd}", arch)
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(2 * rank))
        for t in r.tensors:
            if any(t.name.endswith(f"{x}.weight") for x in targets):
                n_in, n_out = int(t.shape[0]), int(t.shape[1])
                w.add_tensor(t.name + ".lora_a", (rng.standard_normal((rank, n_in)) * 0.01).astype(np.float32))
                w.add_tensor(t.name + ".lora_b", (rng.standard_normal((n_out, rank)) * 0.01).astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "codemoat-tiny.gguf"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tune.md"))
    a = ap.parse_args()
    model_arg = a.model
    if a.model == "gemma":
        import sys

        sys.path.insert(0, str(ROOT / "bench"))
        from gemma import gemma_path

        a.model = str(gemma_path())
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.llamacpp import LlamaCppEngine

    fds = {}
    for name, targets in VARIANTS.items():
        fds[name] = os.memfd_create("lora")
        os.write(fds[name], lora(Path(a.model), targets, a.rank))
    paths = {k: f"/proc/self/fd/{fd}" for k, fd in fds.items()}
    first = next(iter(VARIANTS))
    eng = LlamaCppEngine(a.model, n_ctx=512, n_threads=a.threads, parallel=a.parallel, adapters=paths)
    t0 = time.perf_counter()
    fold = LlamaCppEngine(
        a.model, n_ctx=512, n_threads=a.threads, parallel=a.parallel, adapters={first: paths[first]}, fold_adapters=True
    )
    fold_s = time.perf_counter() - t0
    folded = first in fold._folded
    text = (Path(sysconfig.get_paths()["stdlib"]) / "difflib.py").read_text()
    load0 = os.getloadavg()

    def ask(prompt: str, adapter: str | None, e=eng) -> float:  # noqa: ANN001
        s = time.perf_counter()
        asyncio.run(e.complete(prompt, SamplingParams(max_tokens=16, temperature=0, adapter=adapter)))
        return time.perf_counter() - s

    FOLDED = "folded"
    names: list[str | None] = [None, *VARIANTS, *([FOLDED] if folded else [])]
    times: dict[str | None, list[float]] = {k: [] for k in names}
    for i in range(a.rounds):
        prompt = text[i * 700 : i * 700 + 600]
        for k in names[i % len(names) :] + names[: i % len(names)]:
            if k == FOLDED:
                times[k].append(ask(prompt + f"\n# {k} {i}\n", first, fold))
            else:
                times[k].append(ask(prompt + f"\n# {k} {i}\n", k))
    fold.close()
    same, alt = [], []
    for i in range(a.rounds):
        prompt = text[20000 + i * 700 : 20000 + i * 700 + 600]
        ask(prompt, first)
        same.append(ask(prompt, first))  # the KV cache of the same adapter is reused
        ask(prompt, None)
        alt.append(ask(prompt, first))  # after a switch to the base and back: the slot's cells were kept
    eng.close()
    load1 = os.getloadavg()
    p50 = {k: statistics.median(v) * 1000 for k, v in times.items()}
    lines = [
        "",
        "## Where the adapter's serving overhead comes from (bench/tune_latency.py)",
        "",
        f"Command: `.venv/bin/python bench/tune_latency.py{' --model gemma' if model_arg == 'gemma' else ''} --rank {a.rank} "
        f"--rounds {a.rounds} --threads {a.threads} --parallel {a.parallel}`; "
        f"`{Path(a.model).name}`, {a.parallel} batch slots, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"load average {load0[0]:.1f} → {load1[0]:.1f}. "
        f"Random rank-{a.rank} adapters; 16 greedy tokens after a fresh 600-character prompt, every variant each round "
        "in rotating order (no prefix cache for anyone).",
        "",
        "| adapter | completion p50 | vs base |",
        "| --- | --- | --- |",
        *(f"| {_label(k, first)} | {p50[k]:.0f} ms | {p50[k] / p50[None]:.2f}x |" for k in names),
        "",
        (
            f"Folding the {first} adapter into a copy of the weights took {fold_s:.1f} s at engine start."
            if folded
            else f"The {first} adapter was not folded: {_why(a.model, paths[first])}."
        ),
        f"Same prompt again with the same run-time adapter (its slot's KV cells reused): p50 {statistics.median(same) * 1000:.0f} ms; "
        f"again after a request on the base in between (the adapter switched away and back): p50 {statistics.median(alt) * 1000:.0f} ms.",
    ]
    with open(a.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _label(k: str | None, first: str) -> str:
    if k is None:
        return "none (base)"
    if k == "folded":
        return f"{first}, folded into a copy of the weights (served default)"
    return f"{k}, applied at run time"


def _why(model: str, adapter: str) -> str:
    from codemoat.engines.merge import FOLD_MAX_BYTES, foldable

    if Path(model).stat().st_size > FOLD_MAX_BYTES:
        return "the base is over the size limit"
    return foldable(model, adapter) or "unknown"


if __name__ == "__main__":
    main()
