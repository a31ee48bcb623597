"""The prefix-cache timing channel between users, with and without per-user cache keys.

Alice sends a file (a fresh one each round); Bob then sends the same file plus a little, and a file
of the same length nobody sent. Bob's time to evaluate his prompt (the engine's `prompt_ms`, which
/infill answers in `timings`) tells whether Alice sent it when the two share a cache (as llama-server's
slots do: here both requests without a `cache_key`), and should not once serve keys the cache by user.
Both modes run interleaved in one engine, in one run.

    .venv/bin/python bench/cache_isolation.py [--rounds 12] [--lines 12]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import statistics
import sys
from pathlib import Path

from _results import write_in_place  # bench/ is the script's folder: other sections of the file stay

ROOT = Path(__file__).resolve().parents[1]


def secret_file(rng: random.Random, lines: int) -> str:
    return "".join(f"ACCOUNT_{rng.randrange(10**6)}_KEY = 'sk_live_{rng.randrange(16**12):012x}'\n" for _ in range(lines))


async def prompt_ms(eng, text: str, key: str | None) -> float:
    from codemoat.engines.base import SamplingParams

    last = None
    async for c in eng.stream(text, SamplingParams(max_tokens=1, temperature=0, cache_key=key)):
        last = c.timings or last
    return last.prompt_ms


async def measure(eng, rounds: int, lines: int) -> dict[str, list[float]]:
    rng = random.Random(7)
    out: dict[str, list[float]] = {k: [] for k in ("shared/sent", "shared/unsent", "keyed/sent", "keyed/unsent")}
    for _ in range(rounds):
        for mode in ("shared", "keyed"):
            alice, bob = ("alice", "bob") if mode == "keyed" else (None, None)
            sent, unsent = secret_file(rng, lines), secret_file(rng, lines)
            await prompt_ms(eng, sent, alice)
            out[f"{mode}/sent"].append(await prompt_ms(eng, sent + "def f(", bob))
            out[f"{mode}/unsent"].append(await prompt_ms(eng, unsent + "def f(", bob))
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument(
        "--lines", type=int, default=12, help="lines of the secret file (about 30 tokens each; the bundled model holds 512)"
    )
    ap.add_argument("--model", default=str(ROOT / "models" / "codemoat-tiny.gguf"))
    args = ap.parse_args(argv)
    from codemoat.engines.llamacpp import LlamaCppEngine

    load0 = Path("/proc/loadavg").read_text().split()[:3]
    eng = LlamaCppEngine.from_path(args.model, n_ctx=2048, n_threads=1, parallel=4)
    n_tokens = len(eng.tokenize(secret_file(random.Random(0), args.lines)))
    try:
        res = asyncio.run(measure(eng, args.rounds, args.lines))
    finally:
        eng.close()
    load1 = Path("/proc/loadavg").read_text().split()[:3]
    med = {k: statistics.median(v) for k, v in res.items()}
    rows = [
        f"| {mode} | {med[mode + '/sent']:.2f} | {med[mode + '/unsent']:.2f} | {med[mode + '/unsent'] / med[mode + '/sent']:.2f} |"
        for mode in ("shared", "keyed")
    ]
    report = "\n".join(
        [
            "# The prefix-cache timing channel between users",
            "",
            f"Measured by `.venv/bin/python bench/cache_isolation.py --rounds {args.rounds} --lines {args.lines}` on "
            f"{dt.date.today().isoformat()} (2 CPU cores shared with other work: load average {' '.join(load0)} before, "
            f"{' '.join(load1)} after), one run, both modes interleaved round by round in one batched engine "
            f"(`{Path(args.model).name}`, 4 slots, 1 thread). Each round Alice sends a fresh file of ~{n_tokens} tokens;"
            " Bob then sends it plus `def f(` (sent) and a file of the same length nobody sent (unsent). The figure is the"
            " engine's `prompt_ms` for Bob's prompt (what /infill answers in `timings`), median of the rounds.",
            "",
            "| cache | Bob, a prefix Alice sent (ms) | Bob, a prefix nobody sent (ms) | unsent / sent: what Bob can read |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
            "shared: both requests without a cache key, as llama-server's slots (and codemoat before) reuse any",
            "client's cached prompt. keyed: serve's `cache_key` per user. A ratio near 1 means Bob's timing says",
            "nothing about what Alice sent.",
            "",
        ]
    )
    out = ROOT / "bench" / "results" / "cache_isolation.md"
    write_in_place(out, report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
