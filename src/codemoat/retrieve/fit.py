"""Fitting retrieved snippets into the prompt's token budget."""

from __future__ import annotations

from collections.abc import Callable

MIN_PARTIAL_TOKENS = 48  # below this, a truncated snippet is more noise than help


def approx_tokens(text: str) -> int:
    """About 4 characters per token (code in BPE vocabularies runs 3-4); pass the model's tokenizer for exact counts."""
    return len(text) // 4 + 1


def fit_lines(path: str, text: str, budget: int, count: Callable[[str], int]) -> str | None:
    """The longest head of `text` (whole lines) that, with its path line, costs at most `budget` tokens."""
    if count(path + "\n" + text) <= budget:
        return text
    if budget < MIN_PARTIAL_TOKENS:
        return None
    lines = text.split("\n")
    lo, hi = 0, len(lines)  # lines[:lo] fits, lines[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(path + "\n" + "\n".join(lines[:mid])) <= budget:
            lo = mid
        else:
            hi = mid
    return "\n".join(lines[:lo]) if lo >= 2 else None
