"""The secret screen's cost per prompt, side by side in one run: `audit.redact.find_secrets` with each
detector's needles checked first (the default: a detector whose text lacks all of its needles is not run)
against every detector run on every text (`prefilter=False`, as before 2026-12-06).

Every request's prompt is screened on the server's event loop (`serve.prepare.screen_pending`), so what it
costs every other client waits for. Texts: this repository's own source files, cut to the sizes an editor's
prompt has (the bundled bench prompt's 150 characters, 1,000, 4,000, and 12,000 characters: a 3,000-token
/infill), and the same texts with an AWS key and a password assignment in them. The two variants take
turns text by text; the result is the median time of each and their ratio. Findings are compared too (they
must be the same). Usage: .venv/bin/python bench/screen.py [--reps N]; results in bench/results/screen.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from _results import merge  # noqa: E402

from codemoat.audit.redact import find_secrets  # noqa: E402

SIZES = (150, 1_000, 4_000, 12_000)


def texts() -> dict[str, list[str]]:
    """Per size: slices of the repository's source files, and the same with two secrets in them."""
    src = "".join(p.read_text() for p in sorted((ROOT / "src" / "codemoat").rglob("*.py")))
    out: dict[str, list[str]] = {}
    for n in SIZES:
        plain = [src[i : i + n] for i in range(0, 40 * n, n)][:40]
        out[f"{n:,} chars, code"] = plain
        secret = "\naws_key = 'AKIAIOSFODNN7EXAMPLE'\npassword = \"correct-horse-battery\"\n"
        out[f"{n:,} chars, code with 2 secrets"] = [t[: n - len(secret)] + secret for t in plain]
    return out


def timed(fn, text: str, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(text)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20, help="calls per text and variant")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "screen.md"))
    args = ap.parse_args()
    now = lambda t: find_secrets(t)  # noqa: E731
    before = lambda t: find_secrets(t, prefilter=False)  # noqa: E731
    rows = []
    for label, group in texts().items():
        same = all(now(t) == before(t) for t in group)
        a, b = [], []
        for i, t in enumerate(group):  # turns alternate, text by text
            for name in ("now", "before") if i % 2 else ("before", "now"):
                (a if name == "now" else b).append(timed(now if name == "now" else before, t, args.reps))
        ma, mb = statistics.median(a), statistics.median(b)
        rows.append(f"| {label} | {ma * 1e6:,.0f} µs | {mb * 1e6:,.0f} µs | {ma / mb:.2f} | {'yes' if same else 'NO'} |")
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    head = (
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}\n\n"
        f"`.venv/bin/python bench/screen.py --reps {args.reps}`: 40 texts per row, load average {load}.\n\n"
        "| prompt | needles first (now) | every detector (before) | now / before | same findings |\n"
        "| --- | --- | --- | --- | --- |\n"
    )
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    out.write_text(merge(old, head + "\n".join(rows) + "\n", title="# The secret screen's cost per prompt"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
