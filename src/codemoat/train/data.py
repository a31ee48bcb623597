"""Training samples: file chunks, fill-in-the-middle, and multi-file context, packed into sequences.

Fill-in-the-middle follows Bavarian et al. 2022, "Efficient Training of Language Models to Fill
in the Middle": with probability `fim_rate` (0.5, their recommended rate) a chunk is split into
(prefix, middle, suffix) and moved to

    PSM  <|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>middle
    SPM  <|fim_prefix|><|fim_suffix|>suffix<|fim_middle|>prefix middle   (their §3 variant, App. D)

mixed half and half (their joint PSM+SPM training, §5). The split is applied per chunk ("context-
level FIM", §4.2), so a FIM sample fits the context window. Half of the splits are at random
characters (the paper's span selection); the other half take whole lines as the middle, the shape
of editor completions (as in syntax-aware FIM, Gong et al. 2024, "Evaluation of LLMs on
Syntax-Aware Code Fill-in-the-Middle Tasks").

Multi-file samples use Qwen2.5-Coder's repository format (Hui et al. 2024, §3.1.2):

    <|repo_name|>name\n<|file_sep|>other/path.py\n<snippet><|file_sep|>this/path.py\n<chunk>

with snippets from sibling files that share the most identifiers with the chunk, so the model
learns to copy names from cross-file context (what retrieval puts in the prompt at serving time).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .corpus import SourceFile
from .tokenizer import ENDOFTEXT, FILE_SEP, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, REPO_NAME

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")


@dataclass
class DataOptions:
    chunk_chars: int = 1400  # ≈ n_ctx · bytes-per-token, so most chunks fit one window
    fim_rate: float = 0.5
    spm_rate: float = 0.5
    line_fim_rate: float = 0.5
    repo_rate: float = 0.2
    repo_name: str = "corpus"
    snippet_chars: int = 300
    eos: str = ENDOFTEXT  # the text that ends each sample (a tuned base's own end-of-text token)


def chunks(text: str, size: int) -> list[str]:
    """`text` cut at line ends into pieces of about `size` characters (lines never split)."""
    out: list[str] = []
    cur: list[str] = []
    n = 0
    for line in text.splitlines(keepends=True):
        if n and n + len(line) > size:
            out.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += len(line)
    if cur:
        out.append("".join(cur))
    return out


def fim_split(text: str, rng: random.Random, line_rate: float) -> tuple[str, str, str]:
    """(prefix, middle, suffix) of `text`: whole lines with probability `line_rate`, else random characters."""
    if rng.random() < line_rate:
        lines = text.splitlines(keepends=True)
        if len(lines) >= 2:
            i = rng.randrange(len(lines))
            j = min(len(lines), i + rng.choice((1, 1, 1, 2, 3)))
            return "".join(lines[:i]), "".join(lines[i:j]), "".join(lines[j:])
    a, b = sorted(rng.randrange(len(text) + 1) for _ in range(2))
    return text[:a], text[a:b], text[b:]


class Mark(str):
    """A control token the renderer places (a FIM, repository or end-of-text marker): encoded as that
    token. Everything else in a sample is text from a file, encoded as the characters it is made of."""


def fim_parts(prefix: str, middle: str, suffix: str, spm: bool) -> list[str]:
    if spm:
        return [Mark(FIM_PREFIX), Mark(FIM_SUFFIX), suffix, Mark(FIM_MIDDLE), prefix + middle]
    return [Mark(FIM_PREFIX), prefix, Mark(FIM_SUFFIX), suffix, Mark(FIM_MIDDLE), middle]


def fim_format(prefix: str, middle: str, suffix: str, spm: bool) -> str:
    return "".join(fim_parts(prefix, middle, suffix, spm))


class SnippetIndex:
    """Windows of lines of each file, and the identifiers in them, grouped by directory."""

    def __init__(self, files: list[SourceFile], snippet_chars: int):
        self.by_dir: dict[str, list[tuple[str, str, set[str]]]] = defaultdict(list)
        for f in files:
            d = f.path.rsplit("/", 1)[0]
            for piece in chunks(f.text, snippet_chars)[:20]:  # definitions sit near the top
                self.by_dir[d].append((f.path, piece, set(_IDENT.findall(piece))))

    def best(self, path: str, text: str, k: int, rng: random.Random) -> list[tuple[str, str]]:
        """Up to `k` snippets of other files in `path`'s directory sharing the most identifiers with `text`."""
        cands = [c for c in self.by_dir.get(path.rsplit("/", 1)[0], ()) if c[0] != path]
        if not cands:
            return []
        words = set(_IDENT.findall(text))
        sample = rng.sample(cands, min(len(cands), 64))
        sample.sort(key=lambda c: len(words & c[2]), reverse=True)
        return [(p, s) for p, s, _ in sample[:k]]


def render_parts(files: list[SourceFile], opts: DataOptions, rng: random.Random) -> Iterator[list[str]]:
    """One sample per chunk of every file (FIM or plain, some with cross-file context), each ending in
    `opts.eos`, as a list of text and the control tokens placed around it (`Mark`)."""
    index = SnippetIndex(files, opts.snippet_chars) if opts.repo_rate > 0 else None
    for f in files:
        for piece in chunks(f.text, opts.chunk_chars):
            body = [piece]
            if rng.random() < opts.fim_rate and len(piece) > 8:
                pre, mid, suf = fim_split(piece, rng, opts.line_fim_rate)
                body = fim_parts(pre, mid, suf, spm=rng.random() < opts.spm_rate)
            if index is not None and rng.random() < opts.repo_rate:
                ctx = index.best(f.path, piece, rng.choice((1, 2)), rng)
                if ctx:
                    head = [part for p, s in ctx for part in (Mark(FILE_SEP), f"{p}\n{s}")]
                    body = [Mark(REPO_NAME), f"{opts.repo_name}\n", *head, Mark(FILE_SEP), f"{f.path}\n", *body]
            yield _joined([*body, Mark(opts.eos)])


def _joined(parts: list[str]) -> list[str]:
    """`parts` with neighbouring texts made one (encoded together, as in the joined sample) and empty ones left out."""
    out: list[str] = []
    for p in parts:
        if not p:
            continue
        if out and not isinstance(p, Mark) and not isinstance(out[-1], Mark):
            out[-1] += p
        else:
            out.append(p)
    return out


def render_samples(files: list[SourceFile], opts: DataOptions, rng: random.Random) -> Iterator[str]:
    """`render_parts` joined: one text per sample."""
    for parts in render_parts(files, opts, rng):
        yield "".join(parts)


@contextmanager
def as_text(tok) -> Iterator[Any]:
    """Inside: `tok` (a `tokenizers.Tokenizer`) encodes a control token's spelling in its input
    (`<|endoftext|>`, `<|fim_middle|>` written in a file) as the characters it is made of, as serve
    encodes a client's text, never as the control token itself."""
    was = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        yield tok
    finally:
        tok.encode_special_tokens = was


def encode_samples(tok, samples: list[list[str]]) -> list[list[int]]:
    """Token ids of `render_parts` samples: each `Mark` its control token's id, the text between as text
    (`as_text`): a file cannot write a control token into the training data. Without files that spell
    one, the ids are those of encoding the joined sample (the tokenizer splits at control tokens first)."""
    with as_text(tok):
        texts = iter(tok.encode_batch([p for s in samples for p in s if p and not isinstance(p, Mark)], add_special_tokens=False))
        marks: dict[str, list[int]] = {}
        out = []
        for s in samples:
            ids: list[int] = []
            for p in s:
                if not p:
                    continue
                if isinstance(p, Mark):
                    if p not in marks:  # a marker this vocabulary lacks is its characters, as before
                        i = tok.token_to_id(p)
                        marks[p] = [i] if i is not None else tok.encode(p, add_special_tokens=False).ids
                    ids += marks[p]
                else:
                    ids += next(texts).ids
            out.append(ids)
    return out


def pack(token_lists: list[list[int]], n_ctx: int) -> list[list[int]]:
    """Concatenate samples and cut into rows of n_ctx + 1 tokens (inputs and shifted targets)."""
    flat = [t for ids in token_lists for t in ids]
    row = n_ctx + 1
    return [flat[i : i + row] for i in range(0, len(flat) - row + 1, n_ctx)]


def epoch_rows(files: list[SourceFile], tok, n_ctx: int, opts: DataOptions, seed: int, epoch: int):
    """A shuffled int32 tensor (rows, n_ctx + 1) for one pass over `files`; fresh FIM draws each epoch."""
    import torch

    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(files)
    rng.shuffle(order)
    samples = list(render_parts(order, opts, rng))
    rng.shuffle(samples)
    ids = encode_samples(tok, samples)
    rows = pack(ids, n_ctx)
    if not rows:
        raise ValueError("corpus too small for one training sequence")
    return torch.tensor(rows, dtype=torch.long)
