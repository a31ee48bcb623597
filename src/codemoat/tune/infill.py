"""Single-line infill on held-out files, base vs tuned: exact match and edit similarity.

What an editor asks most: the rest of the line at the cursor, with the code above and below. For
`n` lines drawn (seeded) from the held-out files, the cursor sits at the start of the line (after
the indentation would split a whitespace token the model never saw split: token healing); the
model gets `<|fim_prefix|>` code above `<|fim_suffix|>` code below `<|fim_middle|>` (the FIM format
`tune` trains on, `train.data.fim_format`), the prefix and suffix cut to fit the context, and
completes greedily up to the end of the line. Exact match compares the line without its leading
and trailing whitespace; edit
similarity is 1 − Levenshtein distance / length of the longer (as in CodeXGLUE and RepoBench).
A tokenizer without those FIM tokens gets no score (None), not a misleading one; held-out files
without a line to complete give n = 0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..train.corpus import SourceFile
from ..train.data import as_text
from ..train.tokenizer import ENDOFTEXT, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

MAX_NEW = 24  # tokens generated per line at most


@dataclass(frozen=True)
class Case:
    path: str
    prefix: str
    middle: str  # the whole line, without the newline
    suffix: str


def cases(files: list[SourceFile], n: int, seed: int) -> list[Case]:
    """Up to `n` lines (6-120 characters after the indentation) drawn from `files`, reproducibly."""
    pool: list[tuple[int, int, int]] = []  # (file, start of line, end of line)
    ordered = sorted(files, key=lambda f: f.path)
    for fi, f in enumerate(ordered):
        at = 0
        for line in f.text.splitlines(keepends=True):
            body = line.rstrip("\r\n")
            text = body.lstrip()
            if 6 <= len(text.rstrip()) <= 120 and at > 0:
                pool.append((fi, at, at + len(body)))
            at += len(line)
    picked = random.Random(seed).sample(pool, min(n, len(pool)))
    return [
        Case(ordered[fi].path, ordered[fi].text[:s], ordered[fi].text[s:e], ordered[fi].text[e:]) for fi, s, e in sorted(picked)
    ]


def edit_similarity(a: str, b: str) -> float:
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def scores(model, tok, items: list[Case], n_ctx: int, device: str = "cpu") -> dict | None:
    """{"n", "exact", "edit_sim"} of greedy single-line infill by `model`: None without FIM tokens,
    n = 0 (and no rates) without a line to complete."""
    import torch

    special = {s: tok.token_to_id(s) for s in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)}
    if any(v is None for v in special.values()):
        return None
    if not items:
        return {"n": 0, "exact": None, "edit_sim": None}
    stop = {v for v in (tok.token_to_id(ENDOFTEXT), *special.values()) if v is not None}
    room = n_ctx - 3 - MAX_NEW
    was = model.training
    model.eval()
    exact = sim = 0.0
    with torch.no_grad():
        for c in items:
            with as_text(tok):  # the file's text around the line, control tokens only where the format puts them
                pre = tok.encode(c.prefix, add_special_tokens=False).ids
                suf = tok.encode(c.suffix, add_special_tokens=False).ids
            n_suf = min(len(suf), room // 4)
            pre, suf = pre[-(room - n_suf) :] if room > n_suf else [], suf[:n_suf]
            ids = [special[FIM_PREFIX], *pre, special[FIM_SUFFIX], *suf, special[FIM_MIDDLE]]
            got = _greedy_line(model, tok, ids, stop, device)
            exact += got.strip() == c.middle.strip()
            sim += edit_similarity(got.strip(), c.middle.strip())
    model.train(was)
    return {"n": len(items), "exact": exact / len(items), "edit_sim": sim / len(items)}


def _greedy_line(model, tok, ids: list[int], stop: set[int], device: str) -> str:
    import torch

    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    new: list[int] = []
    for _ in range(MAX_NEW):
        nxt = int(out.logits[0, -1].argmax())
        if nxt in stop:
            break
        new.append(nxt)
        if "\n" in tok.decode(new):
            break
        out = model(input_ids=torch.tensor([[nxt]], device=device), past_key_values=out.past_key_values, use_cache=True)
    return tok.decode(new).split("\n", 1)[0]
