"""Prompt building costs, side by side in one run (issue 13 item 6, issue 15 A1):

1. Greedy reproducibility: the llama.cpp engine evaluates a prompt in ALIGN-token chunks aligned to
   its first token and reuses only cached positions computed that way (`LlamaCppEngine._eval_aligned`),
   against llama-cpp-python's own reuse of any cached prefix. Workload: an editor typing, one FIM
   request per keystroke-group in the same file (the prefix grows a few tokens each time), greedy,
   8 tokens each. Reported: time per request, and whether the same prompt gave the same logits.
2. Fitting: time to first token for a ~3,000-token /infill-shaped request that must be trimmed to
   the context, against a request that already fits with the same final size.

Rounds alternate between the variants so machine noise hits both alike. Results go to
bench/results/prompts.md. Usage: .venv/bin/python bench/prompts.py [--model PATH] [--rounds N]
(default model: $CODEMOAT_BENCH_MODEL, else a Gemma 3 270M GGUF at /tmp/models, else the bundled one).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from codemoat.engines import llamacpp  # noqa: E402
from codemoat.engines.base import SamplingParams  # noqa: E402
from codemoat.engines.llamacpp import LlamaCppEngine  # noqa: E402
from codemoat.engines.templates import FileSnippet, detect_fim  # noqa: E402
from codemoat.serve import prompts  # noqa: E402

ALIGNED = LlamaCppEngine._eval_aligned


def native(self, ids, reproducible=True):  # llama-cpp-python's reuse of any cached prefix (before the fix)
    ALIGNED(self, ids, reproducible=False)


def default_model() -> Path:
    for p in (
        os.environ.get("CODEMOAT_BENCH_MODEL"),
        "/tmp/models/gemma-3-270m-q4_k_m.gguf",
        str(ROOT / "models/codemoat-tiny.gguf"),
    ):
        if p and Path(p).is_file():
            return Path(p)
    raise SystemExit("no model: pass --model PATH")


class First:
    def __init__(self):
        self.logits = None

    def __call__(self, ids, logits):
        if self.logits is None:
            self.logits = np.array(logits, copy=True)
        return logits


async def run(engine, ids, max_tokens, rec=None) -> float:
    """Seconds to the end of a greedy generation (or to its first token with max_tokens=1)."""
    t0 = time.perf_counter()
    async for _ in engine.stream(
        ids, SamplingParams(max_tokens=max_tokens, temperature=0, logits_processors=[rec] if rec else [])
    ):
        pass
    return time.perf_counter() - t0


def source(n_lines: int) -> str:
    return "".join(f"    total = total + values[{i}] * weight_{i % 7}  # step {i}\n" for i in range(n_lines))


async def typing(engine, fim, rounds: int, requests: int = 6) -> dict:
    """Requests as an editor sends them while typing: the prefix grows, the suffix stays."""
    text, suffix = source(40), source(8)
    times = {"native": [], "aligned": []}
    same = {"native": True, "aligned": True}
    for r in range(rounds):
        for name, fn in (("native", native), ("aligned", ALIGNED)) if r % 2 == 0 else (("aligned", ALIGNED), ("native", native)):
            LlamaCppEngine._eval_aligned = fn
            engine.logits("x")  # a cold cache for each variant's series
            for k in range(requests):
                p = prompts.build_fim(engine, fim, prompts.FimInput(text + f"    x{k} = total + {k}", suffix), 8)
                times[name].append(await run(engine, p.ids, 8))
            # the same prompt after that series, and on a fresh cache: equal logits?
            warm, cold = First(), First()
            await run(engine, p.ids, 1, warm)
            engine.logits("x")
            await run(engine, p.ids, 1, cold)
            same[name] &= bool(np.array_equal(warm.logits, cold.logits))
    LlamaCppEngine._eval_aligned = ALIGNED
    return {k: (statistics.median(v), same[k], len(v)) for k, v in times.items()}


async def fitting(engine, fim, rounds: int) -> dict:
    """~3,000 tokens of prefix, suffix and extra files trimmed to the context, against a request of the
    final size that needs no trimming; both from a cold cache, time to the first token."""
    extra = [FileSnippet(f"src/mod{i}.py", source(30)) for i in range(4)]
    big = prompts.FimInput(source(160), source(40), extra=extra)
    trimmed = prompts.build_fim(engine, fim, big, 64)
    body = trimmed.ids[1:] if trimmed.ids[:1] == engine.encode([], bos=True) else trimmed.ids
    if fim is None:  # no FIM tokens: the prompt is the prefix alone
        small = prompts.FimInput(engine.detokenize(body))
    else:
        small = prompts.FimInput(engine.detokenize(body[: len(body) // 2]), engine.detokenize(body[len(body) // 2 :]))
    out = {"trimmed": [], "fitting": []}
    build = {"trimmed": [], "fitting": []}
    sizes = {}
    for r in range(rounds):
        for name, f in (("trimmed", big), ("fitting", small)) if r % 2 == 0 else (("fitting", small), ("trimmed", big)):
            engine.logits("x")
            t0 = time.perf_counter()
            p = prompts.build_fim(engine, fim, f, 64)
            build[name].append(time.perf_counter() - t0)
            await run(engine, p.ids, 1)
            out[name].append(time.perf_counter() - t0)
            sizes[name] = (
                len(p.ids),
                sum(len(engine.encode([prompts.Part(x.text)], bos=False)) for x in [*f.extra])
                + len(engine.encode([prompts.Part(f.prefix + f.suffix)], bos=False)),
            )
    return {k: (statistics.median(v), sizes[k], statistics.median(build[k])) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=6, help="requests per typing series")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1: steadier on a shared machine)")
    a = ap.parse_args()
    model = a.model or default_model()
    engine = LlamaCppEngine.from_path(model, n_ctx=a.n_ctx, n_threads=a.threads)
    n_ctx = engine.n_ctx  # capped by the model's training context
    fim = detect_fim(engine.metadata, engine.has_token)
    t0 = time.perf_counter()
    ty = asyncio.run(typing(engine, fim, a.rounds, a.requests))
    fi = asyncio.run(fitting(engine, fim, a.rounds))
    took = time.perf_counter() - t0
    engine.close()
    lines = [
        "# Prompt building (bench/prompts.py)",
        "",
        f"Model `{model.name}`, n_ctx {n_ctx}, {a.threads} thread(s) of {os.cpu_count()} cores (load average "
        f"{os.getloadavg()[0]:.1f} at the end), FIM template {fim.name if fim else 'none (suffix dropped)'}, ALIGN {llamacpp.ALIGN}, "
        f"{a.rounds} alternating rounds, {took:.0f} s. Command: `.venv/bin/python bench/prompts.py --model {model} "
        f"--rounds {a.rounds} --requests {a.requests} --n-ctx {a.n_ctx} --threads {a.threads}`.",
        "",
        "## Greedy reproducibility: aligned evaluation vs any cached prefix",
        "",
        f"{a.requests} FIM requests per series as an editor sends them while typing (the prefix grows, 8 greedy tokens each).",
        "",
        "| KV-cache reuse | median s per request | same prompt, warm vs cold cache: equal logits | requests |",
        "| --- | --- | --- | --- |",
        f"| any cached prefix (llama-cpp-python, before) | {ty['native'][0]:.3f} | {ty['native'][1]} | {ty['native'][2]} |",
        f"| aligned {llamacpp.ALIGN}-token chunks (now) | {ty['aligned'][0]:.3f} | {ty['aligned'][1]} | {ty['aligned'][2]} |",
        f"| ratio | {ty['aligned'][0] / ty['native'][0]:.2f}x | | |",
        "",
        "## Fitting: time to first token, cold cache",
        "",
        "| request | client tokens | prompt tokens | median ms to build the prompt | median s to first token |",
        "| --- | --- | --- | --- | --- |",
        f"| must be trimmed | {fi['trimmed'][1][1]} | {fi['trimmed'][1][0]} | {fi['trimmed'][2] * 1e3:.1f} | {fi['trimmed'][0]:.3f} |",
        f"| already fits, same final size | {fi['fitting'][1][1]} | {fi['fitting'][1][0]} | {fi['fitting'][2] * 1e3:.1f} | "
        f"{fi['fitting'][0]:.3f} |",
        f"| ratio (target <= 1.2x) | | | | {fi['trimmed'][0] / fi['fitting'][0]:.2f}x |",
        "",
    ]
    out = ROOT / "bench/results/prompts.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
