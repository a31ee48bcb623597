"""Tune a LoRA adapter on two real repositories and measure what it buys and costs.

    .venv/bin/python bench/tune.py [--minutes 3] [--repos rich,httpx] [--model models/codemoat-tiny.gguf]

Indexes the installed sources of the named packages (site-packages; the bundled model never saw
them) in a fresh $CODEMOAT_HOME, runs `codemoat tune`'s own code for the time budget, and reports:
held-out bits/byte of those repositories with and without the adapter, bits/byte on CPython
held-out modules (forgetting), tune tokens/s, the adapter's size, and completion p50 through the
llama.cpp engine with and without the adapter (interleaved, same prompts, greedy). Writes its run
as a new dated section at the top of bench/results/tune.md; every other section stays.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _results import write  # bench/ is the script's folder

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--repos", default="rich,httpx")
    ap.add_argument("--model", default=str(ROOT / "models" / "codemoat-tiny.gguf"))
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--eval-tokens",
        type=int,
        default=80_000,
        help="held-out tokens scored, shared out over every held-out file (80,000: rich + httpx's 15 and the 22 CPython modules whole)",
    )
    ap.add_argument(
        "--old-eval-tokens",
        type=int,
        default=6000,
        help="the figures of sessions up to 8 (first N tokens in path order), as rows",
    )
    ap.add_argument("--completions", type=int, default=8)
    ap.add_argument("--infill-lines", type=int, default=20)
    ap.add_argument(
        "--replay", type=float, default=0.5, help="share of each batch from CPython modules outside the forgetting check"
    )
    ap.add_argument(
        "--max-forgetting",
        type=float,
        default=0.015,
        help="the kept state is at most this much worse on the forgetting-validation modules (negative: no limit)",
    )
    ap.add_argument("--ema", type=float, default=0.95, help="decay of the moving average of the adapter's weights (0: off)")
    ap.add_argument("--kl", type=float, default=1.0, help="weight of the replay rows' KL from the base's predictions (0: off)")
    ap.add_argument("--parallel", type=int, default=4, help="the serving part's batch slots (model.parallel)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tune.md"))
    a = ap.parse_args()
    os.environ["CODEMOAT_HOME"] = tempfile.mkdtemp(prefix="bench-tune-")

    from codemoat.engines.adapters import open_adapter
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.llamacpp import LlamaCppEngine
    from codemoat.index.store import SqliteIndex
    from codemoat.index.update import add_repository
    from codemoat.tune.evaluate import unrelated_files
    from codemoat.tune.trainer import TuneOptions, tune

    names = [n for n in a.repos.split(",") if n]
    store = SqliteIndex()
    for n in names:
        spec = importlib.util.find_spec(n)
        if spec is None or not spec.submodule_search_locations:
            sys.exit(f"package {n} is not installed")
        add_repository(store, Path(list(spec.submodule_search_locations)[0]), n, [f"team-{n}"])
    store.close()
    load0 = os.getloadavg()
    t0 = time.monotonic()
    res = tune(
        TuneOptions(
            repos=names,
            out=Path(os.environ["CODEMOAT_HOME"]) / "bench.moat",
            base=Path(a.model),
            minutes=a.minutes,
            rank=a.rank,
            lr=a.lr,
            threads=a.threads,
            eval_tokens=a.eval_tokens,
            old_eval_tokens=a.old_eval_tokens or None,
            infill_lines=a.infill_lines,
            replay=a.replay,
            max_forgetting=a.max_forgetting if a.max_forgetting >= 0 else None,
            ema=a.ema,
            kl=a.kl,
        )
    )
    wall = time.monotonic() - t0
    m = res.meta
    ad = open_adapter(res.out)

    # serving overhead: the same greedy completions, in rotation: base, base + adapter folded into a copy
    # of the weights (model.fold_adapters, the default), base + adapter applied by llama.cpp at run time
    fd = os.memfd_create("bench-adapter")
    os.write(fd, ad.gguf)
    kw = dict(n_ctx=512, n_threads=a.threads, parallel=a.parallel, adapters={"bench": f"/proc/self/fd/{fd}"})
    eng = LlamaCppEngine(a.model, fold_adapters=True, **kw)
    runtime = LlamaCppEngine(a.model, **kw)
    folded = "bench" in eng._folded
    heldout = m["train"]["heldout_files"]
    prompts = []
    for rel in heldout:
        repo, path = rel.split("/", 1)
        spec = importlib.util.find_spec(repo)
        text = (Path(list(spec.submodule_search_locations)[0]) / path).read_text()
        prompts.append(text[:600])
    prompts = (prompts * a.completions)[: a.completions]
    times: dict[str | None, list[float]] = {None: [], "bench": [], "runtime": []}
    order = [(None, eng, None), ("bench", eng, "bench"), ("runtime", runtime, "bench")]
    for i, p in enumerate(prompts):
        for key, e, which in order[i % 3 :] + order[: i % 3]:
            s = time.perf_counter()
            asyncio.run(e.complete(p, SamplingParams(max_tokens=16, temperature=0, adapter=which)))
            times[key].append(time.perf_counter() - s)
    eng.close()
    runtime.close()
    p50 = {k: statistics.median(v) * 1000 for k, v in times.items()}
    load1 = os.getloadavg()

    e = m["eval"]
    n_unrel = len(unrelated_files())

    def pct(b: float, x: float) -> str:
        return f"{(x - b) / b * 100:+.1f} %"

    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {a.minutes:g} minutes on {a.repos}",
        "",
        f"Command: `.venv/bin/python bench/tune.py --minutes {a.minutes:g} --repos {a.repos} --rank {a.rank} --lr {a.lr:g} "
        f"--threads {a.threads} --eval-tokens {a.eval_tokens} --old-eval-tokens {a.old_eval_tokens} --infill-lines {a.infill_lines} --replay {a.replay:g} "
        f"--max-forgetting {a.max_forgetting:g} --ema {a.ema:g} --kl {a.kl:g} "
        f"--parallel {a.parallel}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Base: `{Path(a.model).name}`; repositories: {', '.join(f'{n} (installed sources)' for n in names)}; "
        f"budget {a.minutes:g} min of training on {a.threads} threads of a shared 2-core AMD EPYC "
        f"(load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end: every figure here is slowed by "
        "the other work on the machine).",
        "",
        "| measure | base | base + adapter | change |",
        "| --- | --- | --- | --- |",
        f"| **held-out bits/byte, tuned repositories** (the goal's figure: every one of the {len(heldout)} files never trained on, "
        f"{_upto(e, 'heldout')}, byte-weighted; data tables included) "
        f"| {e['bpb_base']['tuned']:.3f} | {e['bpb_adapter']['tuned']:.3f} | {pct(e['bpb_base']['tuned'], e['bpb_adapter']['tuned'])} |",
        *_old_row(
            e, "tuned_first", f"the same files, first {a.old_eval_tokens} tokens in path order (the figure of sessions up to 8)"
        ),
        f"| **bits/byte, CPython modules the bundled model never trained on** (the goal's forgetting figure: the "
        f"{n_unrel} of `models/heldout.txt`, {_upto(e, 'unrelated')}) | {e['bpb_base']['unrelated']:.3f} "
        f"| {e['bpb_adapter']['unrelated']:.3f} | {pct(e['bpb_base']['unrelated'], e['bpb_adapter']['unrelated'])} |",
        *_old_row(
            e,
            "unrelated_seen",
            f"the forgetting check of sessions up to 8: 10 CPython modules, 9 of them the bundled model's training files, "
            f"first {a.old_eval_tokens} tokens",
        ),
        *_infill_rows(e),
        f"| completion p50, 16 tokens greedy, llama.cpp, {a.parallel} slots ({len(prompts)} each, rotating), adapter "
        f"{'folded into a copy of the weights (served default)' if folded else 'NOT folded (its weights are not foldable)'} "
        f"| {p50[None]:.0f} ms | {p50['bench']:.0f} ms | {p50['bench'] / p50[None]:.2f}x |",
        f"| the same, adapter applied by llama.cpp at run time (`model.fold_adapters = false`) | {p50[None]:.0f} ms "
        f"| {p50['runtime']:.0f} ms | {p50['runtime'] / p50[None]:.2f}x |",
        "",
        f"Training: {m['train']['steps']} steps, {m['train']['tokens']:,} tokens in {m['train']['seconds']:.0f} s "
        f"= {m['train']['tok_per_s']:,.0f} tokens/s (LoRA rank {a.rank} on every linear layer; {m['train']['replay']:.0%} of "
        f"each batch replayed CPython modules no forgetting check scores{_kl(m['train'])}{_ema(m['train'])}); {m['train']['files']} training files, "
        f"{m['train']['validation_files']} validation files, {m['train']['data_tables']} data tables not trained on; "
        f"the adapter kept is step {m['train']['kept_step']}'s (lowest validation bits/byte, {_f(m['train']['validation_bpb'])}, "
        f"{_kept(m['train'])}); whole run {wall:.0f} s.",
        f"Adapter size: GGUF {m['size']['gguf']:,} bytes, safetensors {m['size']['safetensors']:,} bytes, "
        f"sealed file {m['size']['sealed']:,} bytes.",
        "",
        "The issue's goals (≥ 15 % lower held-out bits/byte, ≤ 2 % worse on CPython, ≤ 1.10x p50) were set "
        "for a 10-minute budget; this run's budget is above.",
        "",
        "Goals: " + "; ".join(f"{name} **{'met' if ok else 'missed'}**" for name, ok in _goals(e, p50)) + ".",
    ]
    write(Path(a.out), "\n".join(lines), TITLE)
    print("\n".join(lines))


TITLE = "# Tuning a LoRA adapter on customer code (bench/tune.py)"


def _goals(e: dict, p50: dict) -> list[tuple[str, bool]]:
    tuned = (e["bpb_adapter"]["tuned"] - e["bpb_base"]["tuned"]) / e["bpb_base"]["tuned"]
    other = (e["bpb_adapter"]["unrelated"] - e["bpb_base"]["unrelated"]) / e["bpb_base"]["unrelated"]
    return [
        (f"held-out bits/byte {tuned * 100:+.1f} % (≤ -15 %)", tuned <= -0.15),
        (f"CPython {other * 100:+.1f} % (≤ +2 %)", other <= 0.02),
        (f"p50 {p50['bench'] / p50[None]:.2f}x (≤ 1.10x)", p50["bench"] / p50[None] <= 1.10),
    ]


def _kept(t: dict) -> str:
    if t.get("max_forgetting") is None:
        return "no forgetting limit"
    base, kept = t["forgetting_validation_bpb"]
    return (
        f"among states at most {t['max_forgetting']:.1%} worse than the base on the forgetting-validation modules: "
        f"{_f(base)} → {_f(kept)}"
    )


def _upto(e: dict, what: str) -> str:
    return f"up to {e[what + '_tokens_per_file']:,} tokens of each, {e[what + '_tokens_scored']:,} in all"


def _old_row(e: dict, key: str, label: str) -> list[str]:
    b, x = e["bpb_base"].get(key), e["bpb_adapter"].get(key)
    if b is None or x is None:
        return []
    return [f"| {label} | {b:.3f} | {x:.3f} | {(x - b) / b * 100:+.1f} % |"]


def _kl(t: dict) -> str:
    return f", their predictions held to the base's by a KL term of weight {t['kl']:g}" if t.get("kl") else ""


def _ema(t: dict) -> str:
    return f"; the weights averaged over the run, decay {t['ema']:g}" if t.get("ema") else ""


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _infill_rows(e: dict) -> list[str]:
    ib, ia = e.get("infill_base"), e.get("infill_adapter")
    if not ib or not ia or not ia["n"]:
        return ["| single-line infill on held-out lines | n/a (no FIM tokens or no line) | | |"]
    return [
        f"| single-line infill, exact match ({ia['n']} held-out lines) | {ib['exact']:.0%} | {ia['exact']:.0%} "
        f"| {(ia['exact'] - ib['exact']) * 100:+.0f} points |",
        f"| single-line infill, edit similarity | {ib['edit_sim']:.3f} | {ia['edit_sim']:.3f} "
        f"| {(ia['edit_sim'] - ib['edit_sim']) * 100:+.1f} points |",
    ]


if __name__ == "__main__":
    main()
