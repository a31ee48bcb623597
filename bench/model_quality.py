"""Quality of the bundled model on held-out modules, side by side with baselines, in one run.

    .venv/bin/python bench/model_quality.py [--model models/codemoat-tiny.gguf] [--cases 500]

1. Bits per byte: the model's cross-entropy on each held-out file (llama.cpp, sliding 512-token
   window, stride 256; the first token is predicted after <|endoftext|>), against `zstd -19` and
   `xz -9` on the same files, each compressed alone (the unit the model sees) and all concatenated.
2. Single-line infill: one non-trivial line of a held-out file is masked; the model gets prefix
   and suffix in the Qwen2.5-Coder PSM format, decodes greedily to the end of the line; compared
   after whitespace normalisation: exact match and edit similarity (1 − Levenshtein/longer length).
   Baselines: the prefix line most similar to the hidden line (an oracle: it peeks at the answer to
   choose), the line after the earlier line most like the one before the hole (a copy that does not
   peek), and the previous non-blank line.
3. Generation speed through the `llamacpp` engine (and the `transformers` engine for comparison).
Writes bench/results/model.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def read_heldout(path: Path) -> list[tuple[str, str]]:
    roots = []
    files = []
    for line in path.read_text().splitlines():
        if line.startswith("# root:"):
            roots.append(Path(line.split(":", 1)[1].strip()))
        elif line and not line.startswith("#"):
            rel = Path(line)
            for r in roots:
                p = r.parent / rel
                if p.is_file():
                    files.append((line, p.read_text(encoding="utf-8")))
                    break
    return files


# -- bits per byte ----------------------------------------------------------------------------------
def model_bits(llm, text: str, eos: int, window: int, stride: int) -> float:
    ids = [eos] + llm.tokenize(text.encode(), add_bos=False, special=False)
    bits = 0.0
    scored = 1  # ids[0] is context only
    start = 0
    while scored < len(ids):
        chunk = ids[start : start + window]
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: len(chunk)], dtype=np.float32)
        first = max(scored - start, 1)  # first position in this chunk not scored yet (as a target)
        rows = logits[first - 1 : len(chunk) - 1].astype(np.float64)  # predictions for targets first..end
        m = rows.max(-1, keepdims=True)
        lse = np.log(np.exp(rows - m).sum(-1)) + m[:, 0]
        bits += float((lse - rows[np.arange(len(rows)), chunk[first:]]).sum()) / math.log(2)
        scored = start + len(chunk)
        if start + window >= len(ids):
            break
        start += stride
    return bits


def compressed_bytes(cmd: list[str], data: bytes) -> int:
    return len(subprocess.run(cmd, input=data, capture_output=True, check=True).stdout)


# -- infill -----------------------------------------------------------------------------------------
def norm(s: str) -> str:
    return " ".join(s.split())


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_sim(a: str, b: str) -> float:
    a, b = norm(a), norm(b)
    if not a and not b:
        return 1.0
    return 1.0 - levenshtein(a, b) / max(len(a), len(b))


def nontrivial(line: str) -> bool:
    s = line.strip()
    return len(s) >= 6 and not s.startswith(("#", '"""', "'''")) and bool(re.search(r"[A-Za-z0-9]", s))


def make_cases(files: list[tuple[str, str]], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pool = []
    for path, text in files:
        lines = text.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if nontrivial(line) and 2 <= i < len(lines) - 1:
                pool.append((path, i))
    rng.shuffle(pool)
    cases = []
    by_path = dict(files)
    for path, i in pool[:n]:
        lines = by_path[path].splitlines(keepends=True)
        cases.append(
            {"path": path, "line": i, "prefix_lines": lines[:i], "target": lines[i].rstrip("\n"), "suffix_lines": lines[i + 1 :]}
        )
    return cases


def fit(tokenize, prefix_lines, suffix_lines, pre_budget: int, suf_budget: int) -> tuple[str, str]:
    """The longest prefix tail and suffix head, in whole lines, within the token budgets."""
    pre: list[str] = []
    n = 0
    for line in reversed(prefix_lines):
        k = len(tokenize(line))
        if n + k > pre_budget:
            break
        pre.insert(0, line)
        n += k
    suf: list[str] = []
    n = 0
    for line in suffix_lines:
        k = len(tokenize(line))
        if n + k > suf_budget:
            break
        suf.append(line)
        n += k
    return "".join(pre), "".join(suf)


def baseline_oracle(prefix: str, target: str) -> str:
    cands = [l for l in prefix.splitlines() if l.strip()]
    return max(cands, key=lambda l: edit_sim(l, target), default="")


def baseline_copy(prefix: str) -> str:
    """No peeking: find the earlier prefix line most like the line before the hole, repeat what followed it
    (the copy an induction head makes)."""
    cands = [l for l in prefix.splitlines() if l.strip()]
    if len(cands) < 3:
        return ""
    last = cands[-1]
    j = max(range(len(cands) - 2), key=lambda i: edit_sim(cands[i], last))
    return cands[j + 1]


def baseline_previous(prefix: str) -> str:
    cands = [l for l in prefix.splitlines() if l.strip()]
    return cands[-1] if cands else ""


def tokens_per_second(engine, prompt: str, runs: int) -> float:
    """Sampled generation (128 tokens, temperature 0.8) after one greedy warm-up run."""
    from codemoat.engines.base import SamplingParams

    asyncio.run(engine.complete(prompt, SamplingParams(max_tokens=128, temperature=0.0)))
    n_tok = 0
    t = time.time()
    for seed in range(runs):
        n_tok += asyncio.run(
            engine.complete(prompt, SamplingParams(max_tokens=128, temperature=0.8, seed=seed))
        ).completion_tokens
    return n_tok / (time.time() - t)


def generation_speed(model: Path, prompt: str, window: int, threads: int) -> dict:
    from codemoat.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine.from_path(model, n_ctx=window, n_threads=threads)
    speed: dict = {"llamacpp": tokens_per_second(eng, prompt, 5)}
    eng.close()
    try:
        import torch

        from codemoat.engines.transformers_engine import TransformersEngine

        torch.set_num_threads(threads)
        tf = TransformersEngine.from_path(model, n_threads=threads)
        speed["transformers"] = tokens_per_second(tf, prompt, 2)
        tf.close()
    except Exception as e:  # the transformers engine is optional here
        speed["transformers"] = f"n/a ({type(e).__name__})"
    return speed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models/codemoat-tiny.gguf"))
    ap.add_argument("--heldout", default=str(ROOT / "models/heldout.txt"))
    ap.add_argument("--cases", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/model.md"))
    ap.add_argument("--max-files", type=int, default=0, help="Use only the first N held-out files (quick checks).")
    args = ap.parse_args()

    import llama_cpp

    from codemoat.engines.base import SamplingParams
    from codemoat.engines.llamacpp import LlamaCppEngine

    files = read_heldout(Path(args.heldout))
    if args.max_files:
        files = files[: args.max_files]
    if not files:
        sys.exit(f"no held-out files found from {args.heldout}")
    model = Path(args.model)
    probe = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    window = min(512, int(probe.metadata.get("llama.context_length", 512)))
    probe.close()
    # 3. generation speed, first: after a llama_cpp.Llama with logits_all has evaluated a batch in this
    # process, a new engine here generates several times slower (measured 2,000 -> 300 tokens/s), so
    # speed is measured before anything else touches llama.cpp.
    speed = generation_speed(model, files[0][1][: window * 2], window, args.threads)

    llm = llama_cpp.Llama(str(model), n_ctx=window, n_batch=window, logits_all=True, n_threads=args.threads, verbose=False)
    eos = llm.token_eos()
    t0 = time.time()

    # 1. bits per byte
    total_bytes = sum(len(t.encode()) for _, t in files)
    bits = sum(model_bits(llm, t, eos, window, window // 2) for _, t in files)
    model_bpb = bits / total_bytes
    comp = {}
    for name, cmd in (("zstd -19", ["zstd", "-19", "-c", "-q"]), ("xz -9", ["xz", "-9", "-c"])):
        per = sum(compressed_bytes(cmd, t.encode()) for _, t in files)
        cat = compressed_bytes(cmd, b"".join(t.encode() for _, t in files))
        comp[name] = (8 * per / total_bytes, 8 * cat / total_bytes)
    t_bpb = time.time() - t0
    llm.close()

    # 2. infill, through the llamacpp engine as the server runs it
    eng = LlamaCppEngine.from_path(model, n_ctx=window, n_threads=args.threads)
    tok = lambda s: eng.tokenize(s, special=False)  # noqa: E731
    cases = make_cases(files, args.cases, args.seed)
    params = SamplingParams(max_tokens=48, temperature=0.0, stop=["\n"])
    res = {"model": [], "spm": [], "prefix": [], "oracle": [], "copy": [], "previous": []}
    t1 = time.time()
    for c in cases:
        prefix, suffix = fit(tok, c["prefix_lines"], c["suffix_lines"], window * 300 // 512, window * 140 // 512 - 12)
        prompts = {
            "model": f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",  # PSM: what the server sends
            "spm": f"<|fim_prefix|><|fim_suffix|>{suffix}<|fim_middle|>{prefix}",  # SPM (Bavarian et al. 2022, App. D)
            "prefix": prefix,  # plain left-to-right continuation, no suffix
        }
        for key, prompt in prompts.items():
            out = asyncio.run(eng.complete(prompt, params)).text.split("\n")[0]
            if key == "model":
                c["prediction"] = out
            res[key].append((norm(out) == norm(c["target"]), edit_sim(out, c["target"])))
        for key, guess in (
            ("oracle", baseline_oracle(prefix, c["target"])),
            ("copy", baseline_copy(prefix)),
            ("previous", baseline_previous(prefix)),
        ):
            res[key].append((norm(guess) == norm(c["target"]), edit_sim(guess, c["target"])))
    t_infill = time.time() - t1

    write_report(args, model, files, total_bytes, model_bpb, comp, res, cases, speed, t_bpb, t_infill)


def write_report(args, model, files, total_bytes, model_bpb, comp, res, cases, speed, t_bpb, t_infill) -> None:
    best_name, (best_per, _) = min(comp.items(), key=lambda kv: kv[1][0])
    best_cat = min(v[1] for v in comp.values())
    ratio = model_bpb / best_per
    em = {k: 100 * sum(e for e, _ in v) / len(v) for k, v in res.items()}
    es = {k: 100 * sum(s for _, s in v) / len(v) for k, v in res.items()}
    card = {}
    summary = model.with_name(model.stem + ".train.json")
    if summary.is_file():
        card = json.loads(summary.read_text())
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    lines = [
        "# Model quality: codemoat-tiny on held-out CPython modules",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/model_quality.py'] + sys.argv[1:])}` — one run, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu}, {args.threads} threads (shared machine).",
        f"Model: `{model.name}` ({model.stat().st_size / 1e6:.1f} MB"
        + (f", {card['params']:,} parameters, {card['tokens']:,} training tokens" if card else "")
        + "). "
        f"Held-out: {len(files)} modules, {total_bytes:,} bytes (`models/heldout.txt`, never trained on).",
        "",
        "## Bits per byte (lower is better)",
        "",
        "| | bits/byte, each file alone | bits/byte, files concatenated |",
        "| --- | ---: | ---: |",
        f"| codemoat-tiny (llama.cpp, 512-token window) | **{model_bpb:.4f}** | {model_bpb:.4f} |",
    ]
    for name, (per, cat) in comp.items():
        lines.append(f"| `{name}` | {per:.3f} | {cat:.3f} |")
    met = ratio <= 0.75
    lines += [
        "",
        f"Model / best compressor ({best_name}, each file alone): **{ratio:.2f}×** (target ≤ 0.75×: "
        f"{'met' if met else 'NOT met'}). Against the best compressor on the concatenation "
        f"(which lets it reuse strings across files, context the model never sees): {model_bpb / best_cat:.2f}×.",
        "",
        f"## Single-line infill ({len(cases)} masked lines, greedy, PSM prompt ≤ 300 prefix + 140 suffix tokens)",
        "",
        "| | exact match | edit similarity |",
        "| --- | ---: | ---: |",
        f"| codemoat-tiny, PSM prompt (the server's Qwen FIM template) | **{em['model']:.1f} %** | **{es['model']:.1f} %** |",
        f"| codemoat-tiny, SPM prompt (suffix first, prefix continued) | {em['spm']:.1f} % | {es['spm']:.1f} % |",
        f"| codemoat-tiny, prefix only (no suffix) | {em['prefix']:.1f} % | {es['prefix']:.1f} % |",
        f"| baseline: most similar prefix line (oracle choice) | {em['oracle']:.1f} % | {es['oracle']:.1f} % |",
        f"| baseline: line after the prefix line most like the one before the hole (no peeking) | {em['copy']:.1f} % | {es['copy']:.1f} % |",
        f"| baseline: previous non-blank line | {em['previous']:.1f} % | {es['previous']:.1f} % |",
        "",
    ]
    better = em["model"] > em["oracle"] and es["model"] > es["oracle"]
    best_mode = max(("model", "spm", "prefix"), key=lambda k: es[k])
    lines.append(
        f"Model vs the oracle baseline: exact match {em['model'] / max(em['oracle'], 1e-9):.2f}×, edit similarity "
        f"{es['model'] / max(es['oracle'], 1e-9):.2f}× ({'above on both' if better else 'NOT above on both'}). "
        f"Best prompt format for this model by edit similarity: {best_mode}."
    )
    lines += ["", "Examples (first 8 cases):", "", "| hidden line | model | oracle baseline |", "| --- | --- | --- |"]
    for c in cases[:8]:
        cell = lambda s: "`" + norm(s).replace("|", "\\|").replace("`", "'")[:60] + "`"  # noqa: E731
        pre = "".join(c["prefix_lines"])
        lines.append(f"| {cell(c['target'])} | {cell(c['prediction'])} | {cell(baseline_oracle(pre[-2000:], c['target']))} |")
    sp_tf = speed["transformers"]
    lines += [
        "",
        "## Generation speed (128 tokens, temperature 0.8, 5 runs)",
        "",
        "| engine | tokens/s |",
        "| --- | ---: |",
        f"| llamacpp (embedded default) | {speed['llamacpp']:,.0f} |",
        f"| transformers (PyTorch, CPU) | {sp_tf:,.0f} |" if isinstance(sp_tf, float) else f"| transformers | {sp_tf} |",
        "",
        f"Timings: bits/byte pass {t_bpb:.0f} s, infill pass {t_infill:.0f} s.",
    ]
    if not met or not better:
        lines += ["", "## Gaps", ""]
        if not met:
            lines.append(
                f"- Bits per byte is {ratio:.2f}× the best compressor, above the 0.75× target. The model saw "
                + (
                    f"{card['tokens']:,} tokens ({card['train_seconds'] / 60:.0f} min on a shared 2-core CPU)"
                    if card
                    else "few tokens"
                )
                + "; held-out loss was still falling when the budget ended (see models/README.md). What would close it: "
                "more training tokens (the same command with `--device cuda` for ~30 min, or a few hours on CPU), "
                "a larger model once compute allows, and a longer context (the compressors see whole files)."
            )
        if not better:
            seen = f"{card['tokens'] / 1e6:.1f} M tokens" if card else "few tokens"
            others = max(("spm", "prefix"), key=lambda k: es[k])
            uses_suffix = es["model"] >= es[others]
            lines.append(
                f"- Infill misses its target: with the server's PSM prompt, exact match {em['model']:.1f} % and edit "
                f"similarity {es['model']:.1f} %, against {em['oracle']:.1f} % / {es['oracle']:.1f} % for the oracle "
                f"baseline, {em['copy']:.1f} % / {es['copy']:.1f} % for the copy baseline that does not peek, and "
                f"{em['previous']:.1f} % / {es['previous']:.1f} % for repeating the previous line. "
                + (
                    "The suffix helps it: PSM is its best prompt. "
                    if uses_suffix
                    else f"It has not yet learned to use the suffix: the {others} prompt, which lets it simply continue the "
                    f"prefix, does better ({em[others]:.1f} % / {es[others]:.1f} %). "
                )
                + f"The model saw {seen}; at that point it models code well enough to beat the compressors, but it "
                "rarely reproduces a whole line, and fill-in-the-middle is learned later than left-to-right modelling "
                "(Bavarian et al. 2022 train on billions of tokens). What would close it: one to two orders of "
                "magnitude more training tokens — the same command with `--device cuda --size small` for about 30 "
                "minutes on one GPU, or many hours on an idle CPU — which no 45-minute run on a 2-core machine can "
                "provide. Until then, serve a real Qwen2.5-Coder GGUF (same special tokens, same template) where "
                "completion quality matters."
            )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
