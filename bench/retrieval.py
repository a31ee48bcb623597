"""Cross-file retrieval benchmark on real code: CPython's standard library and real packages.

Cases (built with Python's own `ast`, independently of the tree-sitter index): in a file F, a call
`name(...)`, `module.name(...)` or `Class.method(...)` whose target is defined in another file G of
the same repository (imports resolved, re-exports followed). The cursor sits at the start of the
call expression, as in CrossCodeEval (Ding et al. 2023, cursor right before the cross-file entity):
prefix = F up to there, suffix = the rest of F after that line. A retriever scores a hit at rank r
when its r-th unit comes from G, spans the definition's line and contains that line's text.

Compared in the same run, over the same cases:
- codemoat: `Retriever.snippets_for_completion` (symbols + BM25, fused);
- BM25: SQLite FTS5 BM25 over the same chunks, the last 20 prefix lines as the query;
- Jaccard: RepoCoder/CrossCodeEval's sliding windows (20 lines, step 10) ranked by the Jaccard
  similarity of their token sets to the last 20 prefix lines (Zhang et al. 2023).
Units from F itself are excluded for all three (its text is already in the prompt).

Speed and size (the machine is shared and busy: compare the ratios measured in this same run):
indexing the standard library from scratch vs tree-sitter parsing alone over the same files, each in
its own subprocess (peak RSS from getrusage); re-indexing after one file changes; retrieval latency.

Run: .venv/bin/python bench/retrieval.py [--per-repo 40] [--stdlib-cases 160] [--out bench/results/retrieval.md]
     [--seed 0] [--recall-only]  (--recall-only: recall rows only, no timing or model sections, nothing written)
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _results import write_in_place  # bench/ is the script's folder: other sections of the file stay

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from codemoat.index.store import SqliteIndex  # noqa: E402
from codemoat.index.terms import unique_terms  # noqa: E402
from codemoat.index.update import add_repository, update_repository  # noqa: E402
from codemoat.index.walk import list_files  # noqa: E402
from codemoat.retrieve import Retriever  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SITE = ROOT / ".venv/lib/python3.11/site-packages"
PACKAGES = ["httpx", "rich", "typer", "click", "starlette", "fastapi", "pydantic", "sqlalchemy"]
STDLIB_EXCLUDE = ["test/*", "*/test/*", "*/tests/*", "idlelib/idle_test/*", "site-packages/*", "lib2to3/tests/*"]
GROUP = frozenset({"bench"})


@dataclass
class Case:
    repo: str
    path: str  # F, relative
    line: int  # 1-based line of the call
    col: int  # cursor column: right before the cross-file name
    line_start: int  # column where the line's code starts (the whole-line variant puts the cursor there)
    gold_path: str
    gold_line: int
    gold_text: str
    name: str
    target: str  # the rest of the masked line from the cursor


# -- cases -----------------------------------------------------------------------------------------
def _module_names(files: list[str], package: str) -> dict[str, str]:
    mods = {}
    for rel in files:
        if not rel.endswith(".py"):
            continue
        parts = rel[:-3].split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(([package] if package else []) + parts)] = rel
    return mods


def build_cases(root: Path, repo: str, package: str, files: list[str]) -> list[Case]:
    mods = _module_names(files, package)
    trees: dict[str, ast.Module] = {}
    texts: dict[str, list[str]] = {}
    for mod, rel in mods.items():
        try:
            src = (root / rel).read_text("utf-8")
            trees[mod] = ast.parse(src)
            texts[mod] = src.split("\n")
        except (SyntaxError, UnicodeDecodeError, ValueError):
            pass

    def defs(mod: str) -> dict[str, ast.AST]:
        return {n.name: n for n in trees[mod].body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}

    def absolute(mod: str, is_pkg: bool, level: int, target: str | None) -> str:
        if not level:
            return target or ""
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[: len(base) - (level - 1)] if level > 1 else base
        return ".".join(base + ([target] if target else []))

    def resolve(mod: str, name: str, hops: int = 0) -> tuple[str, ast.AST] | None:
        if mod not in trees or hops > 3:
            return None
        d = defs(mod).get(name)
        if d is not None:
            return mod, d
        is_pkg = mods[mod].endswith("__init__.py")
        for n in trees[mod].body:
            if isinstance(n, ast.ImportFrom):
                for a in n.names:
                    if (a.asname or a.name) == name:
                        return resolve(absolute(mod, is_pkg, n.level, n.module), a.name, hops + 1)
        return None

    cases: list[Case] = []
    for mod, tree in trees.items():
        rel = mods[mod]
        is_pkg = rel.endswith("__init__.py")
        names: dict[str, tuple[str, str]] = {}
        modules: dict[str, str] = {}
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom):
                src_mod = absolute(mod, is_pkg, n.level, n.module)
                for a in n.names:
                    if f"{src_mod}.{a.name}" in trees:
                        modules[a.asname or a.name] = f"{src_mod}.{a.name}"
                    else:
                        names[a.asname or a.name] = (src_mod, a.name)
            elif isinstance(n, ast.Import):
                for a in n.names:
                    if a.asname and a.name in trees:
                        modules[a.asname] = a.name
                    elif a.name in trees and "." not in a.name:
                        modules[a.name] = a.name
        seen: set[tuple[str, int]] = set()
        calls = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))
        for n in calls:  # the first use of each cross-file definition, as CrossCodeEval does
            f = n.func
            hit = None
            if isinstance(f, ast.Name) and f.id in names:
                hit = resolve(*names[f.id])
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                owner = f.value.id
                if owner in modules:
                    hit = resolve(modules[owner], f.attr)
                elif owner in names:
                    cls = resolve(*names[owner])
                    if cls and isinstance(cls[1], ast.ClassDef):
                        for m in cls[1].body:
                            if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef) and m.name == f.attr:
                                hit = (cls[0], m)
            if hit is None or hit[0] == mod or n.lineno != n.end_lineno:
                continue
            gmod, gnode = hit
            key = (gmod, gnode.lineno)
            if key in seen:
                continue
            seen.add(key)
            line = texts[mod][n.lineno - 1]
            # Cursor right before the cross-file name (after `module.`/`Class.` when there is one).
            col = f.col_offset if isinstance(f, ast.Name) else f.end_col_offset - len(f.attr)
            line_start = len(line) - len(line.lstrip())
            gold_text = texts[gmod][gnode.lineno - 1].strip()
            cases.append(Case(repo, rel, n.lineno, col, line_start, mods[gmod], gnode.lineno, gold_text, gnode.name,
                              line[col:].strip()))  # fmt: skip
    return cases


def case_io(root: Path, c: Case, whole_line: bool = False) -> tuple[str, str]:
    """(prefix, suffix): the file up to the cursor, and the file after the masked line."""
    lines = (root / c.path).read_text("utf-8").split("\n")
    cur = lines[c.line - 1]
    prefix = "\n".join(lines[: c.line - 1] + [cur[: c.line_start if whole_line else c.col]])
    suffix = "\n".join(lines[c.line :])
    return prefix, suffix


# -- baselines -------------------------------------------------------------------------------------
_TOK = re.compile(r"\w+")


class Jaccard:
    """RepoCoder's sparse retriever: 20-line windows every 10 lines, Jaccard of token sets."""

    def __init__(self, root: Path, files: list[str], size: int = 20, step: int = 10):
        self.windows: list[tuple[str, int, int, frozenset[str], str]] = []
        for rel in files:
            try:
                lines = (root / rel).read_text("utf-8").split("\n")
            except (UnicodeDecodeError, OSError):
                continue
            for s in range(0, max(1, len(lines) - size + step), step):
                chunk = lines[s : s + size]
                self.windows.append((rel, s + 1, s + len(chunk), frozenset(_TOK.findall("\n".join(chunk))), "\n".join(chunk)))

    def search(self, prefix: str, current: str, k: int) -> list[tuple[str, int, int, str]]:
        q = frozenset(_TOK.findall("\n".join(prefix.split("\n")[-20:])))
        scored = []
        for rel, s, e, toks, text in self.windows:
            if rel == current or not toks:
                continue
            inter = len(q & toks)
            if inter:
                scored.append((inter / (len(q) + len(toks) - inter), rel, s, e, text))
        scored.sort(key=lambda x: -x[0])
        return [(rel, s, e, text) for _, rel, s, e, text in scored[:k]]


def rank_of(units: list[tuple[str, int, int, str]], c: Case) -> int | None:
    for i, (path, s, e, text) in enumerate(units, 1):
        if path == c.gold_path and s <= c.gold_line <= e and c.gold_text in text:
            return i
    return None


def metrics(ranks: list[int | None]) -> dict[str, float]:
    n = len(ranks)
    return {
        "recall@1": sum(1 for r in ranks if r == 1) / n,
        "recall@5": sum(1 for r in ranks if r and r <= 5) / n,
        "mrr@10": sum(1 / r for r in ranks if r and r <= 10) / n,
    }


# -- speed -----------------------------------------------------------------------------------------
_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {src!r})
mode, root, db = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter()
if mode == "parse":
    from pathlib import Path
    from codemoat.index.walk import list_files, read_bytes, decode
    from codemoat.index.chunk import parse_only
    n = 0
    for rel in list_files(Path(root), ["*.py"], {excl!r}):
        raw = read_bytes(Path(root) / rel)
        text = decode(raw) if raw is not None else None
        if text is not None:
            parse_only(rel, text); n += 1
else:
    from codemoat.index.store import SqliteIndex
    from codemoat.index.update import add_repository
    st = add_repository(SqliteIndex(db), root, "stdlib", ["bench"], include=["*.py"], exclude={excl!r})
    n = st.indexed
print(json.dumps({{"seconds": time.perf_counter() - t, "files": n,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def child(mode: str, root: Path, db: Path) -> dict:
    code = _CHILD.format(src=str(ROOT / "src"), excl=STDLIB_EXCLUDE)
    out = subprocess.run([sys.executable, "-c", code, mode, str(root), str(db)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def count_lines(root: Path, files: list[str]) -> int:
    return sum((root / f).read_bytes().count(b"\n") for f in files)


# -- model -----------------------------------------------------------------------------------------
def model_em(retriever: Retriever, items: list, model_path: Path, limit: int) -> dict | None:
    """Single-line exact match of the bundled model, greedy, without and with retrieved snippets.

    The bundled model was trained with a 512-token context: the prompt holds up to 160 tokens of
    snippets, the last 260 tokens of the prefix and the first 60 of the suffix.
    """
    if not model_path.is_file():
        return None
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), n_ctx=512, n_threads=1, verbose=False)  # 1: no spin-waiting on a busy machine

    def tok(s: str) -> list[int]:
        return llm.tokenize(s.encode(), add_bos=False, special=False)

    def count(s: str) -> int:
        return len(tok(s))

    res: dict[str, dict[str, int]] = {}
    for c, (prefix, suffix) in items[:limit]:
        group = "stdlib" if c.repo == "stdlib" else "packages"
        r = res.setdefault(group, {"without": 0, "with": 0, "n": 0})
        snips = retriever.snippets_for_completion(groups=GROUP, repo=c.repo, path=c.path, prefix=prefix, suffix=suffix,
                                                  k=5, budget_tokens=160, count_tokens=count)  # fmt: skip
        pre = llm.detokenize(tok(prefix)[-260:]).decode("utf-8", "replace")
        suf = llm.detokenize(tok(suffix)[:60]).decode("utf-8", "replace")
        ctx = "".join(f"<|file_sep|>{s.path}\n{s.text}" for s in snips)
        fim = f"<|fim_prefix|>{pre}<|fim_suffix|>{suf}<|fim_middle|>"
        # With snippets: the repository format the model was trained on (Qwen2.5-Coder's, src/codemoat/train/data.py).
        with_ctx = f"<|repo_name|>{c.repo}\n{ctx}<|file_sep|>{c.path}\n{fim}" if snips else fim
        for key, prompt in (("without", fim), ("with", with_ctx)):
            ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            out = llm.create_completion(ids, max_tokens=40, temperature=0.0, stop=["\n"])
            got = out["choices"][0]["text"].split("\n")[0].strip()
            r[key] += int(got == c.target.strip())
        r["n"] += 1
    return res


# -- main ------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-repo", type=int, default=40)
    ap.add_argument("--stdlib-cases", type=int, default=160)
    ap.add_argument("--model-cases", type=int, default=150)
    ap.add_argument("--out", default=str(ROOT / "bench/results/retrieval.md"))
    ap.add_argument("--seed", type=int, default=0, help="case sampling seed (the reported run uses 0)")
    ap.add_argument("--recall-only", action="store_true", help="print recall per repository; skip speed and model, write nothing")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="cm-bench-"))
    try:
        report(args, rng, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(args, rng: random.Random, work: Path) -> None:
    # A private copy of the stdlib so that re-indexing after a change can edit a file.
    stdlib = work / "stdlib"
    files = list_files(STDLIB, ["*.py"], STDLIB_EXCLUDE)
    for rel in files:
        dst = stdlib / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(STDLIB / rel, dst)
    n_lines = count_lines(stdlib, files)

    db = work / "index.db"
    if args.recall_only:
        add_repository(SqliteIndex(db), stdlib, "stdlib", ["bench"], include=["*.py"], exclude=STDLIB_EXCLUDE)
    else:
        load_start = os.getloadavg()[0]  # other jobs on this machine skew the times: the report says how busy it was
        parse = child("parse", stdlib, work / "parse.db")
        index = child("index", stdlib, db)
    store = SqliteIndex(db)
    reindex_s = 0.0
    if not args.recall_only:
        victim = stdlib / "email/utils.py"
        victim.write_text(victim.read_text() + "\n\ndef _bench_added(x):\n    return x\n")
        t = time.perf_counter()
        upd = update_repository(store, "stdlib")
        reindex_s = time.perf_counter() - t
        assert upd.indexed == 1, upd
        victim.write_bytes((STDLIB / "email/utils.py").read_bytes())
        update_repository(store, "stdlib")

    repos = [("stdlib", stdlib, "", files, args.stdlib_cases)]
    for pkg in PACKAGES:
        root = SITE / pkg
        add_repository(store, root, pkg, ["bench"], include=["*.py"])
        repos.append((pkg, root, pkg, list_files(root, ["*.py"]), args.per_repo))

    retriever = Retriever(db)
    rows = {}
    all_cases, all_inputs = [], []
    latencies: list[float] = []
    totals: dict[str, list] = {"codemoat": [], "BM25": [], "Jaccard": [], "codemoat, cursor at line start": []}
    for name, root, package, rfiles, n in repos:
        cases = build_cases(root, name, package, rfiles)
        cases = rng.sample(cases, min(n, len(cases)))
        jac = Jaccard(root, rfiles)
        rid = store.repo(name).id
        ranks: dict[str, list] = {"codemoat": [], "BM25": [], "Jaccard": [], "codemoat, cursor at line start": []}
        for c in cases:
            prefix, suffix = case_io(root, c)
            t = time.perf_counter()
            snips = retriever.snippets_for_completion(groups=GROUP, repo=name, path=c.path, prefix=prefix,
                                                      suffix=suffix, k=10, budget_tokens=10**6)  # fmt: skip
            latencies.append(time.perf_counter() - t)
            ranks["codemoat"].append(rank_of([(s.path, s.start_line, s.end_line, s.text) for s in snips], c))
            q = unique_terms(prefix.split("\n")[-20:], limit=64)
            hits = store.search(q, [rid], 40)
            rows_ = store.chunks([h for h, _ in hits])
            units = [(r.path, r.start_line, r.end_line, r.text) for r in (rows_[h] for h, _ in hits) if r.path != c.path]
            ranks["BM25"].append(rank_of(units[:10], c))
            ranks["Jaccard"].append(rank_of(jac.search(prefix, c.path, 10), c))
            lp, ls = case_io(root, c, whole_line=True)
            snips = retriever.snippets_for_completion(groups=GROUP, repo=name, path=c.path, prefix=lp, suffix=ls,
                                                      k=10, budget_tokens=10**6)  # fmt: skip
            ranks["codemoat, cursor at line start"].append(
                rank_of([(s.path, s.start_line, s.end_line, s.text) for s in snips], c)
            )
            all_cases.append(c)
            all_inputs.append((prefix, suffix))
        rows[name] = (len(cases), {m: metrics(r) for m, r in ranks.items() if r})
        for m in totals:
            totals[m].extend(ranks[m])
        print(name, rows[name], flush=True)

    overall = {m: metrics(r) for m, r in totals.items()}
    if args.recall_only:
        for m, v in overall.items():
            print(f"{m}: " + ", ".join(f"{k} {x:.3f}" for k, x in v.items()))
        return
    model_path = ROOT / "models/codemoat-tiny.gguf"
    items = list(zip(all_cases, all_inputs, strict=True))
    rng.shuffle(items)
    em = model_em(retriever, items, model_path, args.model_cases)

    lat = sorted(latencies)
    p50 = statistics.median(lat) * 1000
    p95 = lat[int(0.95 * (len(lat) - 1))] * 1000
    write(args.out, n_lines, len(files), parse, index, reindex_s, p50, p95, rows, overall, len(all_cases), em,
          (load_start, os.getloadavg()[0]))  # fmt: skip


def write(out, n_lines, n_files, parse, index, reindex_s, p50, p95, rows, overall, n_cases, em, load) -> None:
    c, b, j = overall["codemoat"], overall["BM25"], overall["Jaccard"]
    ratio = index["seconds"] / parse["seconds"]
    ok = lambda cond: "met" if cond else "**not met**"  # noqa: E731
    lines = [
        "# Cross-file retrieval benchmark",
        "",
        f"Generated by `bench/retrieval.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"The machine is shared ({os.cpu_count()} cores, other engineers' jobs): absolute times vary; "
        "ratios are measured side by side in the same run. "
        f"Load average (1 min) when the speed section started: {load[0]:.2f}; at the end: {load[1]:.2f}.",
        "",
        f"{n_cases} cases from real code (see the module docstring for how they are built): a call to a function, "
        "class or method defined in another file of the same repository; cursor at the start of the call. "
        "Hit = a retrieved unit from the defining file that spans the definition's line.",
        "",
        "## Overall",
        "",
        "| retriever | recall@1 | recall@5 | MRR@10 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for m, v in overall.items():
        lines.append(f"| {m} | {v['recall@1']:.3f} | {v['recall@5']:.3f} | {v['mrr@10']:.3f} |")
    lines += [
        "",
        "The first three rows use the CrossCodeEval cursor (right before the cross-file name, after `module.` or "
        "`Class.` when the call has one). The last row is the harder variant where the whole line is masked "
        "(cursor at the start of the line's code): nothing of the call is typed yet.",
    ]
    lines += [
        "",
        f"Targets: recall@5 ≥ 0.85 — {ok(c['recall@5'] >= 0.85)} ({c['recall@5']:.3f}); "
        f"≥ 15 points above Jaccard — {ok(c['recall@5'] - j['recall@5'] >= 0.15)} "
        f"(+{100 * (c['recall@5'] - j['recall@5']):.1f} points; BM25: +{100 * (c['recall@5'] - b['recall@5']):.1f}).",
        "",
        "## Per repository (recall@5: codemoat / BM25 / Jaccard)",
        "",
        "| repository | cases | codemoat R@1 | codemoat R@5 | BM25 R@5 | Jaccard R@5 | codemoat MRR |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, (n, ms) in rows.items():
        lines.append(
            f"| {name} | {n} | {ms['codemoat']['recall@1']:.2f} | {ms['codemoat']['recall@5']:.2f} | "
            f"{ms['BM25']['recall@5']:.2f} | {ms['Jaccard']['recall@5']:.2f} | {ms['codemoat']['mrr@10']:.2f} |"
        )
    lines += [
        "",
        "## Speed and size (standard library without its tests)",
        "",
        f"- Files: {n_files} Python files, {n_lines:,} lines.",
        f"- Tree-sitter parsing alone (read + decode + parse, own process): {parse['seconds']:.2f} s.",
        f"- Indexing from scratch (walk, hash, parse, chunk, symbols, FTS5, one transaction, own process): "
        f"{index['seconds']:.2f} s — {ratio:.2f}× parsing alone. Target ≤ 60 s {ok(index['seconds'] <= 60)}, "
        f"≤ 3× parsing {ok(ratio <= 3)}.",
        f"- Peak memory (max RSS) while indexing: {index['maxrss_mb']:.0f} MB (parsing alone: {parse['maxrss_mb']:.0f} MB). "
        f"Target ≤ 500 MB {ok(index['maxrss_mb'] <= 500)}.",
        f"- Re-index after one file changed: {reindex_s * 1000:.0f} ms. Target ≤ 1 s {ok(reindex_s <= 1)}.",
        f"- Retrieval latency per completion (k=10, index of 9 repositories): p50 {p50:.1f} ms, p95 {p95:.1f} ms. "
        f"Target p95 ≤ 50 ms {ok(p95 <= 50)}.",
        "",
        "## Bundled model: single-line exact match with and without retrieval",
        "",
    ]
    if em is None:
        lines.append(
            "Not measured: `models/codemoat-tiny.gguf` was not present when this ran (it is trained by another engineer)."
        )
    else:
        lines += [
            "Greedy. Without retrieval: `<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`; with retrieval, "
            "the repository format the model was trained with (Qwen2.5-Coder's): `<|repo_name|>{repo}\\n<|file_sep|>{path}\\n{snippet}... "
            "<|file_sep|>{this path}\\n` before the same FIM prompt "
            "(the model was trained with a 512-token context: ≤160 tokens of snippets, the last 260 tokens of the "
            "prefix, the first 60 of the suffix); exact match of the rest of the masked line.",
            "",
            "| cases | n | EM without retrieval | EM with retrieval |",
            "| --- | ---: | ---: | ---: |",
        ]
        for group, r in em.items():
            n = max(r["n"], 1)
            lines.append(f"| {group} | {r['n']} | {r['without']} ({r['without'] / n:.1%}) | {r['with']} ({r['with'] / n:.1%}) |")
        lines += [
            "",
            "The bundled model was trained on most of the standard library (its held-out list is "
            "`models/codemoat-tiny.heldout.txt`), so the stdlib row measures recall of training data as much as "
            "completion; the packages row is code it did not see.",
        ]
    lines += [
        "",
        "## How to read these numbers",
        "",
        "- codemoat's units are its chunks (functions, methods, class skeletons, module windows) and outlines "
        "built at query time from the symbol table: after `module.` the signatures of the module's definitions "
        "and of those it re-exports (at most 30 in all, likeliest first, one outline per defining file); after "
        "`Class.` the class's header and its methods' signatures (at most 30, those called on the class first); "
        "and per repository file the signatures of the names this file imports from it. An outline counts as a "
        "hit when it holds the definition's signature line (as written), as a class skeleton does for a method; "
        "it holds signatures and first docstring sentences, not bodies.",
        "- Recall is measured on rankings of 10 without a token budget; the model rows use the budget stated there.",
        "- Cases are sampled with a fixed seed (0); the weights in `codemoat/retrieve` were tuned on cases drawn "
        "with another seed (1) from the same repositories' other cases (those outside the seed-0 sample) and "
        "checked on a third draw (seed 2), so some optimism remains (`--seed N --recall-only` reruns the recall "
        "rows on another draw).",
        "- BM25 and Jaccard see only the text before the cursor (their published form); codemoat also reads the "
        "suffix and the file's imports, as a completion request carries both.",
        "- Dense retrieval (embeddings, e.g. wordllama's bundled weights) was not tried in the time available, so "
        "it is not used: nothing here has to be downloaded or shipped besides the grammars.",
        "",
    ]
    write_in_place(Path(out), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
