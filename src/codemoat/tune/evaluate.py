"""Bits per byte of held-out code: -Σ log2 p(token) / bytes, the tokenizer-independent measure.

Each file is scored on its own (plain text, no FIM), in windows of n_ctx tokens; the first token of
a file is context only. Files are taken in sorted order up to a token budget, and the bytes counted
are exactly those of the predicted tokens, so base and base + adapter are scored on the same bytes.
"""

from __future__ import annotations

import math
import sys
import sysconfig
from pathlib import Path

from ..train.corpus import SourceFile

#: stdlib modules used as "unrelated code" for the forgetting check (present in every CPython)
UNRELATED_MODULES = [
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


#: stdlib modules replayed during tuning against forgetting: none of them is in UNRELATED_MODULES,
#: so the forgetting check still scores code the adapter never trained on
REPLAY_MODULES = [
    "argparse.py",
    "functools.py",
    "dataclasses.py",
    "enum.py",
    "pathlib.py",
    "subprocess.py",
    "tokenize.py",
    "configparser.py",
    "pprint.py",
    "logging/__init__.py",
    "collections/__init__.py",
    "email/message.py",
    "http/client.py",
    "urllib/parse.py",
    "zipfile/__init__.py",
    "tarfile.py",
]


#: stdlib modules scored while tuning to see forgetting as it happens (the kept adapter state is one
#: that made them at most `TuneOptions.max_forgetting` worse): in neither list above, so neither the
#: replay trains on them nor does the final forgetting check score them
FORGETTING_VALIDATION_MODULES = [
    "inspect.py",
    "typing.py",
    "statistics.py",
    "ast.py",
]


def forgetting_validation_files() -> list[SourceFile]:
    """The CPython modules of FORGETTING_VALIDATION_MODULES that this Python has."""
    return _stdlib(FORGETTING_VALIDATION_MODULES)


def replay_files() -> list[SourceFile]:
    """The CPython modules of REPLAY_MODULES that this Python has."""
    return _stdlib(REPLAY_MODULES)


def unrelated_files() -> list[SourceFile]:
    """A few CPython standard-library modules: code no customer repository is."""
    return _stdlib(UNRELATED_MODULES)


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
    """`token_windows` with the budget shared out over the files (the start of each, every file
    scored): a selection score that one long file in sorted order would otherwise make all its own."""
    windows: list[list[int]] = []
    nbytes = 0
    for f in files:
        w, n = token_windows([f], tok, n_ctx, max(32, max_tokens // max(1, len(files))))
        windows += w
        nbytes += n
    return windows, nbytes


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
