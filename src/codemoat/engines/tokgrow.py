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
- the new text, tokenised from the cut (which is needed anyway), must begin with exactly the old ids of the part
  both texts share, up to `SLACK` bytes before the first that differs: a tokeniser that splits otherwise at the
  cut (SentencePiece with its space prefix, say) fails this and the text is tokenised whole. A caller (scope) whose
  texts fail it `GIVE_UP` times without ever passing is not tried again while its texts are held. (Until 2026-12-07
  the count was the vocabulary's, shared by all callers: one user whose edits kept failing the check switched
  growth off for everyone, and whether it was on told others something of what he sent. Until then too the old
  text's tail was tokenised again for the check: a second call of llama.cpp's tokeniser, whose fixed cost run
  cold, ~0.2 ms in the server between a request's decode steps, made growing an ~900-byte prefix slower than
  tokenising it whole.)
`tests/engines/test_tokgrow.py` compares the ids with whole tokenisations over thousands of random edits.

Like `tokcache`, a text is only ever grown from the same caller's own texts (`SCOPE`): how fast a request is
tokenised must not tell anyone what someone else sent. Each scope keeps its `PER_SCOPE` latest long texts, and
all scopes together at most `MAX_BYTES` of memory (each text counted with its ids and token ends, `held`), the
scope used least recently going first (its count of checks goes with it: back, it is tried again, `GIVE_UP` more
times at most).

The counts (`grown`, `whole`, `failed`, `passed`: /metrics' `codemoat_tokenizer_long_texts_total`) change under
the lock; before 2026-12-07 they were `+= 1` outside it, and requests tokenised at once on the server's threads
could lose some (a read, then a write, with another thread's between: rare under CPython 3.11's GIL, not on a
free-threaded interpreter).
"""

from __future__ import annotations

import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

#: a text shorter than this (bytes) is tokenised whole: too little to gain
MIN_BYTES = 512
#: the cut is at least this many bytes before the first byte that differs: split decisions look ahead a few bytes
MARGIN = 64
#: the check compares the ids of the shared part up to this many bytes before the first byte that differs (the
#: tokens just before a change may change with it)
SLACK = 32
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
#: a scope whose texts failed the check this many times, never passing it, is not tried again (while it is held)
GIVE_UP = 16


@dataclass(eq=False)
class Grown:
    """One tokenised text: its bytes, ids, and the byte offset each token ends at (computed when first needed)."""

    data: bytes
    ids: array
    ends: array | None = field(default=None)  # 8-byte offsets, once computed


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
    j = bisect_right(ends, same - MARGIN)  # tokens [0, j) end at or before that byte
    for _ in range(MAX_WALK):
        if j <= 0:
            return None
        e = ends[j - 1]
        if e > 0 and data[e - 1] == 0x0A and data[e] not in (0x0A, 0x0D):
            return j
        j -= 1
    return None


def _ends(ids: Sequence[int], special: bool, lengths: Callable, start: int, stop: int) -> array | None:
    """The offsets at which `ids` end, from `start`; None unless they end at `stop` (their texts add up)."""
    got = lengths(ids, special)
    if got is None:
        return None
    out = array("q", accumulate(got, initial=start))
    del out[0]
    return out if (out[-1] if out else start) == stop else None


class TokenGrowth:
    """The latest long texts of each scope, and `tokenise`, which reuses their ids for a text that grew from one."""

    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.grown = self.whole = self.failed = self.passed = 0  # counts (under `_lock`), for /metrics, tests, bench
        self._scopes: OrderedDict[tuple[str, bool], list[Grown]] = OrderedDict()
        # [failed, passed] checks of each scope in `_scopes` (dropped with its texts): when it gives up
        self._checks: dict[tuple[str, bool], list[int]] = {}
        self._lock = threading.Lock()

    def tokenise(
        self,
        scope: str,
        special: bool,
        data: bytes,
        native: Callable[[bytes, bool], list[int]],
        lengths: Callable[[Sequence[int], bool], list[int] | None],
    ) -> list[int]:
        """The ids of `data` as `native(data, special)` gives them, from a grown text's ids where the check passes.
        `lengths(ids, special)`: the byte length of each token's text (None if one has none)."""
        got = self._grow(scope, special, data, native, lengths) if len(data) >= MIN_BYTES else None
        if got is None:
            ids, ends = native(data, special), None  # its ends are computed if a later text grows from it
        else:
            ids, ends = got
        self._keep(scope, special, Grown(data, array("i", ids), ends) if len(data) >= MIN_BYTES else None, got is not None)
        return ids

    def _grow(
        self, scope: str, special: bool, data: bytes, native: Callable, lengths: Callable
    ) -> tuple[list[int], array | None] | None:
        """(ids, their ends) of `data` grown from one of the scope's texts, or None (tokenise it whole)."""
        key = (scope, special)
        with self._lock:
            failed, passed = self._checks.get(key, (0, 0))
            if failed >= GIVE_UP and not passed:  # this scope's, not the vocabulary's: others' texts still grow
                return None
            recent = list(self._scopes.get(key, ()))
        best, same = None, 0
        for g in recent:
            n = common_prefix(g.data, data)
            if n > same:
                best, same = g, n
        if best is None or same < MIN_BYTES // 2:
            return None
        if best.ends is None:  # once per text tokenised whole; a grown one's come with it
            best.ends = _ends(best.ids, special, lengths, 0, len(best.data))
            if best.ends is None:
                return None  # its tokens' texts do not add up to the text (a space prefix, a control token's)
        j = cut_at(best, same)
        if j is None:
            return None
        e = best.ends[j - 1]
        if e < len(data) // 4:  # an edit near the start: growing saves little
            return None
        k = bisect_right(best.ends, same - SLACK)  # the old tokens [j, k) lie in the shared part
        tail = native(data[e:], special)
        ok = k > j and tail[: k - j] == best.ids[j:k].tolist()
        self._checked(key, ok)
        if not ok:
            return None
        more = _ends(tail, special, lengths, e, len(data))
        return best.ids[:j].tolist() + tail, (best.ends[:j] + more if more is not None else None)

    def _checked(self, key: tuple[str, bool], ok: bool) -> None:
        """Count a check of scope `key`'s text, passed (`ok`) or failed: in all, and for the scope while it is held."""
        with self._lock:
            if ok:
                self.passed += 1
            else:
                self.failed += 1
            mine = self._checks.setdefault(key, [0, 0]) if key in self._scopes else [0, 0]
            mine[1 if ok else 0] += 1

    def _keep(self, scope: str, special: bool, g: Grown | None, grown: bool) -> None:
        """Count a long text tokenised (`grown` from one of the scope's, or whole), and keep it (`g`) as the scope's
        latest: both under the lock, once."""
        key = (scope, special)
        with self._lock:
            if grown:
                self.grown += 1
            else:
                self.whole += 1
            if g is None or held(g) > self.max_bytes:
                return
            recent = self._scopes.pop(key, [])
            recent.insert(0, g)
            self.bytes += held(g)
            for old in recent[PER_SCOPE:]:
                self.bytes -= held(old)
            self._scopes[key] = recent[:PER_SCOPE]
            while self.bytes > self.max_bytes:
                gone, dropped = self._scopes.popitem(last=False)
                self.bytes -= sum(held(x) for x in dropped)
                self._checks.pop(gone, None)
