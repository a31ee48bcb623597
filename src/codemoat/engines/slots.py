"""The batched llama.cpp context's sequence slots (`engines.batch`): which request each one serves and
which tokens' KV cells it holds, and which free slot a new request takes.

A slot keeps its KV cells after its request ends. A new request takes the free slot whose cached tokens
share the longest prompt prefix with it (editors resend the same file prefix on every keystroke; among
equals the slot used least recently), keeps that prefix's cells, all of them, as `llama-server`'s
`cache_prompt` does, and drops the rest of the slot's (`llama_memory_seq_rm`).

A cached prefix is reused only by the user who left it (`SamplingParams.cache_key`: another user's
prompt would tell in the time to first token) and only under the adapter set it was computed under:
under another set it would give wrong logits, and under the base it would hand a user the effect of a
team's tuned weights on that prompt. Cells stay across an adapter switch (each was computed under its
own sequence's adapter and stays valid for it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .base import Chunk, SamplingParams
from .worker import StopCutter


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share: list slices compared in C, halving the span that differs
    (a Python loop over a 2,000-token prompt took ~50 µs per slot, on the batcher's thread)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo]; a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(eq=False)  # one request is itself only (`in`, `remove` compare identity, not every field)
class Seq:
    """One request: its prompt, parameters and callbacks, and where it stands in its slot."""

    ids: list[int]
    params: SamplingParams
    emit: Callable[[Chunk], None]
    cancel: threading.Event
    finished: Callable[[BaseException | None], None]
    want_logits: bool = False  # `Engine.logits`: evaluate the prompt, keep its next-token logits, stop
    result: Any = None
    slot: int = -1
    pos: int = 0  # next prompt position to evaluate (of ids[:-1])
    n_past: int = 0  # tokens of this sequence in its slot's KV cells
    next_token: int = -1  # the token to feed at the next decode step
    phase: str = "prefill"  # prefill → decode (the last prompt token, then each sampled one)
    n_gen: int = 0
    text: str = ""  # the answer's text so far: its complete UTF-8 sequences, decoded
    tail: bytes = b""  # the bytes of a UTF-8 sequence not complete yet
    history: list[int] = field(default_factory=list)
    chain: Any = None  # llama.cpp sampler chain; None: plain greedy (argmax)
    cutter: StopCutter | None = None
    row: int = -1  # this step's batch row with logits
    out: int = -1  # its index among the step's outputs (a row of `llama_get_logits`)


class Slot:
    def __init__(self) -> None:
        self.cached: list[int] = []  # tokens whose KV cells this slot holds, positions 0..len-1
        self.used_at = 0.0
        self.owner: str | None = None  # `SamplingParams.cache_key` of the request that left `cached`
        self.adapter: str | None = None  # the adapter set `cached` was computed under (None: the base)
        self.seq: Seq | None = None


class Slots:
    """The context's `parallel` slots over its memory (`llama_get_memory`); runs on the batcher's thread."""

    def __init__(self, lib: Any, mem: Any, parallel: int):
        self.lib, self.mem = lib, mem
        self.all = [Slot() for _ in range(parallel)]
        self.reused_tokens = 0  # prompt tokens whose KV cells a slot already held (prefix reuse)

    def __getitem__(self, i: int) -> Slot:
        return self.all[i]

    def free(self) -> list[int]:
        return [i for i, s in enumerate(self.all) if s.seq is None]

    def claim(self, seq: Seq, free: list[int], adapter: str | None) -> int:
        """Give `seq` the free slot with the longest prefix of its prompt it may reuse, drop the slot's
        other cells, and return how many prompt tokens it holds already."""
        p, body = seq.params, seq.ids[:-1]

        def keep(i: int) -> int:
            s = self.all[i]
            if s.adapter != adapter:  # cells computed under another adapter set (or the base)
                return 0
            if s.owner != p.cache_key:  # another user's prompt: reusing it would tell in the time to first token
                return 0
            return common_prefix(s.cached, body)

        kept = {j: keep(j) for j in free}
        i = max(free, key=lambda j: (kept[j], -self.all[j].used_at))
        slot, k = self.all[i], kept[i]
        if not self.lib.llama_memory_seq_rm(self.mem, i, k, -1):  # a cache that cannot drop a tail (some SWA/recurrent ones)
            self.lib.llama_memory_seq_rm(self.mem, i, 0, -1)  # dropping a whole sequence never fails
            k = 0
        self.reused_tokens += k
        slot.cached, slot.adapter = body[:k], adapter
        slot.seq, slot.used_at, slot.owner = seq, time.monotonic(), p.cache_key
        seq.slot = i
        return k

    def release(self, i: int) -> None:
        """The slot's request ended; its cells stay for the next request to reuse."""
        slot = self.all[i]
        slot.seq, slot.used_at = None, time.monotonic()

    def forget(self, i: int) -> None:
        """Drop every cell of slot `i` (after a failure its cells are not trusted again)."""
        self.lib.llama_memory_seq_rm(self.mem, i, 0, -1)
        self.all[i].cached = []
