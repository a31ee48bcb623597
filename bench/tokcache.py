"""What an editor's keystroke costs the server to build its FIM prompt, with and without `engines.tokcache` and `tokgrow`.

A llama.vscode-shaped request per keystroke: the file before the cursor (the prefix, three characters longer
each time), the text after it (1,500 characters, unchanged), and four chunks of other files (1,200 characters
each, unchanged: llama.vscode's ring of chunks, Continue's and Tabby's extra context). Each is the server's own
work: `serve.prompts.build_fim` on the model's vocabulary (the server's `front`, as `codemoat serve` tokenises),
with the caller's scope set (`tokcache.SCOPE`, as `Service.prepare` sets it: unchanged texts come from the
cache, and the prefix is tokenised from where it grew, `tokgrow`), with the scope set but the prefix tokenised
whole (the cache alone, as until 2026-12-07), or without a scope (every text tokenised whole). Keystrokes rotate the
order of the three, so machine noise hits all alike; CPU time of this process per keystroke (time.process_time),
median over the run.

    .venv/bin/python bench/tokcache.py [--models bundled,gemma] [--keystrokes 300]

Results: bench/results/tokcache.md (replaced).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from codemoat.engines import llamavocab  # noqa: E402
from codemoat.engines.llamacpp import LlamaCppEngine  # noqa: E402
from codemoat.engines.templates import FileSnippet, detect_fim  # noqa: E402
from codemoat.engines.tokcache import SCOPE  # noqa: E402
from codemoat.serve import prompts  # noqa: E402
from serve import FILE, model_path  # noqa: E402

TEXT = FILE * 3
CURSOR = 2000


def keystroke(i: int) -> prompts.FimInput:
    cur = CURSOR + 3 * i
    extra = [FileSnippet(f"src/mod{k}.py", TEXT[5000 + 1200 * k : 5000 + 1200 * (k + 1)]) for k in range(4)]
    return prompts.FimInput(TEXT[:cur], TEXT[cur : cur + 1500], extra=extra, path="src/payments.py")


def run(name: str, n: int, n_ctx: int) -> str:
    path = model_path(name)
    front = type("Slot", (LlamaCppEngine,), {"n_ctx": n_ctx}).front(str(path))  # the served slot's context
    fim = detect_fim(front.metadata, front.has_token)
    modes = ("whole", "cache", "grown")  # no scope; the cache alone (a scope of its own, tokgrow off); both
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    same = True
    grow_at = llamavocab.MIN_BYTES
    try:
        for i in range(-2, n):
            got = {}
            for mode in modes[i % 3 :] + modes[: i % 3]:
                token = SCOPE.set({"whole": None, "cache": "bob", "grown": "alice"}[mode])
                llamavocab.MIN_BYTES = 1 << 62 if mode == "cache" else grow_at
                try:
                    t0 = time.process_time()
                    got[mode] = prompts.build_fim(front, fim, keystroke(i + 2), 64)
                    t = time.process_time() - t0
                finally:
                    SCOPE.reset(token)
                    llamavocab.MIN_BYTES = grow_at
                if i >= 0:
                    cpu[mode].append(t * 1000)
            same = same and got["grown"].ids == got["whole"].ids == got["cache"].ids
        hits, misses = front.token_cache().hits, front.token_cache().misses
        growth = front.token_growth()
    finally:
        front.close()
    whole, cache, grown = (statistics.median(cpu[m]) for m in modes)
    tokens = len(got["grown"].ids)
    return (
        f"| {name} (`{path.name}`, FIM {'tokens' if fim else 'none: the suffix is dropped'}) | {tokens} | "
        f"{whole:.3f} | {cache:.3f} | {grown:.3f} | {grown / whole:.2f} | {grown / cache:.2f} | {same} | "
        f"{hits} / {hits + misses} | {growth.grown} / {growth.grown + growth.whole} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bundled,gemma")
    ap.add_argument("--keystrokes", type=int, default=300)
    ap.add_argument("--n-ctx", type=int, default=2048, help="the slot's context the prompt is fitted to")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tokcache.md"))
    a = ap.parse_args()
    rows = [run(m, a.keystrokes, a.n_ctx) for m in a.models.split(",")]
    import os

    load = os.getloadavg()
    text = "\n".join(
        [
            "# An editor's keystroke: the server's CPU to build its FIM prompt (bench/tokcache.py)",
            "",
            __doc__.split("\n\n")[1].replace("\n", " "),
            "",
            f"`.venv/bin/python bench/tokcache.py --models {a.models} --keystrokes {a.keystrokes} --n-ctx {a.n_ctx}`, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, "
            f"{a.keystrokes} keystrokes each.",
            "",
            "| model | prompt tokens | ms CPU per keystroke, every text tokenised | unchanged texts cached | and the prefix "
            "grown | grown / whole | grown / cached | same ids | cache hits / look-ups | prefixes grown / long texts |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
