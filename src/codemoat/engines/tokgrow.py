"""Token ids of a text that grew from one tokenised a moment ago: only its new end is tokenised.

An editor sends the file before the cursor on every keystroke, a few characters longer each time (or
changed a few lines up). `tokcache` finds texts sent again unchanged; this finds the caller's recent text
that the new one starts like, keeps that text's ids up to a line start before the first byte that differs,
and tokenises only the rest. For ~4,000 characters of prefix that was ~0.4 ms of llama.cpp's tokeniser run
cold, before every first token; a 25,000-character neighbourhood costs milliseconds.

Whether the ids are the ones a whole tokenisation gives is not assumed; it is checked:
- the cut is a line start (after a `\\n`, before a byte that is not `\\r` or `\\n`) at least `MARGIN` bytes
  before the first byte that differs, and the end of one of the old text's tokens. llama.cpp's pre-tokenisers
  (GPT-2-style expressions: qwen2, llama3, deepseek, starcoder ...) split there, and their split points depend
  on a few bytes after them at most, which both texts share;
- the old text, tokenised from the cut to its end, must give exactly the old ids after the cut (a tokeniser
  that splits otherwise, SentencePiece with its space prefix say, fails this and the text is tokenised whole).
  A vocabulary that fails it `GIVE_UP` times without ever passing is not tried again.
`tests/engines/test_tokgrow.py` compares the ids with whole tokenisations over thousands of random edits.

Like `tokcache`, a text is only ever grown from the same caller's own texts (`SCOPE`): how fast a request is
tokenised must not tell anyone what someone else sent. Each scope keeps its `PER_SCOPE` latest long texts, and
all scopes together at most `MAX_BYTES` of memory (each text counted with its ids and token ends, `held`), the
scope used least recently going first.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: a text shorter than this (bytes) is tokenised whole: too little to gain
MIN_BYTES = 512
#: the cut is at least this many bytes before the first byte that differs: split decisions look ahead a few bytes
MARGIN = 64
#: the old text's part after the cut that the check tokenises again: at most this many bytes (an edit far up a long
#: text is tokenised whole rather than checked at the cost of most of a whole tokenisation)
TAIL_MAX = 4096
#: line starts looked at, going back from the differing byte, before giving up (a file of one very long line)
MAX_WALK = 512
#: latest long texts kept per scope (the prefix, and a few of the other texts a FIM prompt has)
PER_SCOPE = 4
#: bytes held for all scopes together: texts with their ids and token ends (`held`). Counting the text alone, a
#: text of a token a byte (rare CJK, emoji) held 13 bytes for each counted: 104 MiB for 8 MiB of text; code, at ~0.3
#: tokens a byte, costs ~4.6 bytes a byte, so this holds ~7 MiB of code as 8 MiB of text did
MAX_BYTES = 32 << 20
#: what a token costs held: its id (4 bytes) and the offset its text ends at (8, once computed)
TOKEN_BYTES = 12
#: a vocabulary whose tokeniser failed the check this many times, never passing it, is not tried again
GIVE_UP = 16


@dataclass(eq=False)
class Grown:
    """One tokenised text: its bytes, ids, and the byte offset each token ends at (computed when first needed)."""

    data: bytes
    ids: array
    ends: Any = field(default=None)  # a numpy array, once computed


def held(g: Grown) -> int:
    """The bytes `g` holds, counted against `MAX_BYTES`: its text, its ids, and its token ends once computed."""
    return len(g.data) + TOKEN_BYTES * len(g.ids)


def common_prefix(a: bytes, b: bytes) -> int:
    """The length of the longest common prefix of `a` and `b`: block by block, then a binary search in the block
    that differs (slices compare with memcmp; a loop over bytes in Python would cost more than tokenising)."""
    n, lo, step = min(len(a), len(b)), 0, 4096
    while lo + step <= n and a[lo : lo + step] == b[lo : lo + step]:
        lo += step
    hi = min(lo + step, n)
    while lo < hi:  # a[:lo] == b[:lo] holds
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def cut_at(old: Grown, same: int) -> int | None:
    """The index of the old text's first token after the cut: its tokens before it end at a line start at least
    `MARGIN` bytes before byte `same`, the first that differs (None: no such line start)."""
    assert old.ends is not None
    data, ends = old.data, old.ends
    j = int(ends.searchsorted(same - MARGIN, side="right"))  # tokens [0, j) end at or before that byte
    for _ in range(MAX_WALK):
        if j <= 0:
            return None
        e = int(ends[j - 1])
        if e > 0 and data[e - 1] == 0x0A and data[e] not in (0x0A, 0x0D):
            return j
        j -= 1
    return None


class TokenGrowth:
    """The latest long texts of each scope, and `tokenise`, which reuses their ids for a text that grew from one."""

    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.grown = self.whole = self.failed = self.passed = 0  # counts, for tests and the bench
        self._scopes: OrderedDict[tuple[str, bool], list[Grown]] = OrderedDict()
        self._lock = threading.Lock()

    def tokenise(
        self,
        scope: str,
        special: bool,
        data: bytes,
        native: Callable[[bytes, bool], list[int]],
        ends: Callable[[array, bool], Any],
    ) -> list[int]:
        """The ids of `data` as `native(data, special)` gives them, from a grown text's ids where the check passes.
        `ends(ids, special)`: the byte offset each token's text ends at, a numpy array (None if unknown)."""
        ids = self._grow(scope, special, data, native, ends) if len(data) >= MIN_BYTES else None
        if ids is None:
            ids = native(data, special)
            self.whole += 1
        else:
            self.grown += 1
        if len(data) >= MIN_BYTES:
            self._keep(scope, special, Grown(data, array("i", ids)))
        return ids

    def _grow(self, scope: str, special: bool, data: bytes, native: Callable, ends: Callable) -> list[int] | None:
        if self.failed >= GIVE_UP and not self.passed:
            return None
        with self._lock:
            recent = list(self._scopes.get((scope, special), ()))
        best, same = None, 0
        for g in recent:
            n = common_prefix(g.data, data)
            if n > same:
                best, same = g, n
        if best is None or same < MIN_BYTES // 2:
            return None
        if best.ends is None:
            got = ends(best.ids, special)
            if got is None or not len(got) or int(got[-1]) != len(best.data):
                return None  # its tokens' texts do not add up to the text (a space prefix, a control token's)
            best.ends = got
        j = cut_at(best, same)
        if j is None:
            return None
        e = int(best.ends[j - 1])
        if len(best.data) - e > TAIL_MAX:
            return None
        if native(best.data[e:], special) != best.ids[j:].tolist():
            self.failed += 1
            return None
        self.passed += 1
        return best.ids[:j].tolist() + native(data[e:], special)

    def _keep(self, scope: str, special: bool, g: Grown) -> None:
        if held(g) > self.max_bytes:
            return
        key = (scope, special)
        with self._lock:
            recent = self._scopes.pop(key, [])
            recent.insert(0, g)
            self.bytes += held(g)
            for old in recent[PER_SCOPE:]:
                self.bytes -= held(old)
            self._scopes[key] = recent[:PER_SCOPE]
            while self.bytes > self.max_bytes:
                _, dropped = self._scopes.popitem(last=False)
                self.bytes -= sum(held(x) for x in dropped)
