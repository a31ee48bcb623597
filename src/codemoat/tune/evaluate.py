"""Bits per byte of held-out code: -Σ log2 p(token) / bytes, the tokenizer-independent measure.

Each file is scored on its own (plain text, no FIM), in windows of n_ctx tokens; the first token of
a file is context only. `spread_windows` scores every file of a set, up to the same number of tokens
from each (as many as the budget allows: small files whole), and the bytes counted are exactly those
of the predicted tokens, so base and base + adapter are scored on the same bytes and the figure is
byte-weighted. `token_windows` takes files in sorted order up to a budget (the figure of sessions up
to 8: on rich + httpx its 6,000 tokens were 2 of 15 held-out files).
"""

from __future__ import annotations

import math
import sys
import sysconfig
from pathlib import Path

from ..train.corpus import SourceFile
from ..train.data import as_text

#: the forgetting check: the bundled model's own held-out CPython 3.11 modules (models/heldout.txt,
#: never trained on), present in every CPython 3.11 (other versions have most of them)
UNRELATED_MODULES = [
    "_aix_support.py",
    "_bootsubprocess.py",
    "codecs.py",
    "ctypes/_endian.py",
    "curses/__init__.py",
    "encodings/charmap.py",
    "gzip.py",
    "importlib/_abc.py",
    "importlib/simple.py",
    "lib2to3/fixes/fix_exec.py",
    "lib2to3/fixes/fix_paren.py",
    "lib2to3/pgen2/conv.py",
    "multiprocessing/popen_spawn_win32.py",
    "shlex.py",
    "tempfile.py",
    "turtledemo/minimal_hanoi.py",
    "turtledemo/round_dance.py",
    "turtledemo/two_canvases.py",
    "urllib/robotparser.py",
    "wsgiref/handlers.py",
    "zoneinfo/_common.py",
    "zoneinfo/_zoneinfo.py",
]

#: the forgetting check of sessions up to 8, still scored beside it for comparison (`seen_files`): all
#: but shlex.py are the bundled model's own training files, so it measured how much of the base's fit
#: to its training code survived, not forgetting of code it never saw
SEEN_MODULES = [
    "textwrap.py",
    "json/decoder.py",
    "csv.py",
    "shlex.py",
    "fractions.py",
    "heapq.py",
    "calendar.py",
    "difflib.py",
    "ipaddress.py",
    "string.py",
]


#: characters of public code replayed while tuning (`replay_files`): about a million tokens, two
#: replay rows a step for a thousand steps, tokenized in seconds
REPLAY_CHARS = 3_000_000


#: stdlib modules scored while tuning to see forgetting as it happens (the kept adapter state is one
#: that made them at most `TuneOptions.max_forgetting` worse): the replay (`replay_files`) leaves them
#: out and the final forgetting check does not score them, and, like the final check's
#: modules, code the bundled model never trained on (its corpus left out files over 200 kB and venv/).
#: Until session 8 these were inspect, typing, statistics and ast, its training files: on rich + httpx
#: they read about twice the forgetting the never-trained modules show, so the guard kept early states
FORGETTING_VALIDATION_MODULES = [
    "_pydecimal.py",
    "venv/__init__.py",
]


def forgetting_validation_files() -> list[SourceFile]:
    """The CPython modules of FORGETTING_VALIDATION_MODULES that this Python has."""
    return _stdlib(FORGETTING_VALIDATION_MODULES)


def replay_files(seed: int = 0, max_chars: int = REPLAY_CHARS) -> list[SourceFile]:
    """Public code replayed while tuning, against forgetting: this Python's standard library as `vendor
    train` collects it, less every module a forgetting check scores (UNRELATED_MODULES,
    FORGETTING_VALIDATION_MODULES, SEEN_MODULES), a seeded sample of whole modules up to `max_chars`.
    On CPython 3.11 that is the bundled model's own training code (its 638 training modules less the
    old check's nine), rendered as it was trained on, which keeps what it knows (until session 10 the
    replay was sixteen of those modules in plain windows; bench/results/tune.md compares)."""
    import random

    from ..train.corpus import collect

    root = Path(sysconfig.get_paths()["stdlib"])
    scored = set(UNRELATED_MODULES) | set(FORGETTING_VALIDATION_MODULES) | set(SEEN_MODULES)
    files = [f for f in collect([root]) if f.path.split("/", 1)[1] not in scored]
    random.Random(seed).shuffle(files)
    out, n = [], 0
    for f in files:
        if n >= max_chars:
            break
        out.append(f)
        n += len(f.text)
    return out


def unrelated_files() -> list[SourceFile]:
    """The CPython modules of UNRELATED_MODULES that this Python has: code no customer repository is."""
    return _stdlib(UNRELATED_MODULES)


def seen_files() -> list[SourceFile]:
    """The CPython modules of SEEN_MODULES (the old forgetting check) that this Python has."""
    return _stdlib(SEEN_MODULES)


def _stdlib(modules: list[str]) -> list[SourceFile]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for rel in modules:
        p = root / rel
        if p.is_file():
            out.append(SourceFile(f"python{sys.version_info[0]}.{sys.version_info[1]}/{rel}", p.read_text("utf-8")))
    return out


def token_windows(files: list[SourceFile], tok, n_ctx: int, max_tokens: int) -> tuple[list[list[int]], int]:
    """(windows of at most n_ctx + 1 ids, bytes of the predicted tokens), up to `max_tokens` predictions."""
    windows: list[list[int]] = []
    nbytes = budget = 0
    for f in sorted(files, key=lambda f: f.path):
        with as_text(tok):  # a control token's spelling in a file is scored as the text it is
            enc = tok.encode(f.text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        take = min(len(ids), max_tokens - budget + 1)
        if take < 2:
            continue
        ids = ids[:take]
        # predicted tokens are ids[1:]: their characters run from the end of token 0 to the end of the last
        nbytes += len(f.text[offsets[0][1] : offsets[take - 1][1]].encode("utf-8"))
        budget += take - 1
        for s in range(0, take - 1, n_ctx):
            windows.append(ids[s : s + n_ctx + 1])
        if budget >= max_tokens:
            break
    return windows, nbytes


def spread_windows(files: list[SourceFile], tok, n_ctx: int, max_tokens: int) -> tuple[list[list[int]], int]:
    """`token_windows` of every file, up to `per_file_tokens` of each: every file is scored (a figure
    that one long file in sorted order would otherwise make all its own), byte-weighted."""
    cap = per_file_tokens(files, tok, max_tokens)
    windows: list[list[int]] = []
    nbytes = 0
    for f in files:
        w, n = token_windows([f], tok, n_ctx, cap)
        windows += w
        nbytes += n
    return windows, nbytes


def per_file_tokens(files: list[SourceFile], tok, max_tokens: int, least: int = 32) -> int:
    """The largest N (at least `least`) for which N tokens or the whole file, whichever is less, from
    every file of `files` fit in `max_tokens` predictions: the budget shared out, small files whole."""
    with as_text(tok):
        sizes = [max(0, len(tok.encode(f.text, add_special_tokens=False).ids) - 1) for f in files]
    if not sizes or sum(sizes) <= max_tokens:
        return max([least, *sizes])
    lo, hi = least, max(sizes)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(s, mid) for s in sizes) <= max_tokens else (lo, mid - 1)
    return lo


def bits_per_byte(model, windows: list[list[int]], nbytes: int, device: str = "cpu") -> float | None:
    """Held-out bits per byte of `model` on pre-cut windows (None without any)."""
    import torch
    import torch.nn.functional as F

    if not windows or not nbytes:
        return None
    was = model.training
    model.eval()
    nats = 0.0
    with torch.no_grad():
        for w in windows:
            if len(w) < 2:
                continue
            x = torch.tensor([w], device=device)
            logits = model(input_ids=x[:, :-1]).logits.float()
            nats += F.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
    model.train(was)
    return nats / math.log(2) / nbytes
