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


# -- fitting a fill-in-the-middle prompt into the context, as llama.cpp's server does for /infill ---
# (tools/server: `format_prompt_infill`): the end of the prefix and the start of the suffix are kept,
# the suffix getting at most a quarter of the room; cross-file context gets only what is left.
SUFFIX_SHARE = 4


def split_room(n_prefix: int, n_suffix: int, room: int) -> tuple[int, int]:
    """How many prefix and suffix tokens to keep in `room` tokens: all of both when they fit; else the
    suffix keeps at most room // SUFFIX_SHARE (less if shorter), the prefix the rest, and room the prefix
    leaves goes back to the suffix."""
    room = max(0, room)
    if n_prefix + n_suffix <= room:
        return n_prefix, n_suffix
    suffix = min(n_suffix, room // SUFFIX_SHARE)
    prefix = min(n_prefix, room - suffix)
    return prefix, min(n_suffix, room - prefix)


def keep_items(costs: list[int], room: int) -> int:
    """How many of the items at the END of `costs` fit in `room` (context nearest the code wins)."""
    used = kept = 0
    for c in reversed(costs):
        if used + c > room:
            break
        used += c
        kept += 1
    return kept
