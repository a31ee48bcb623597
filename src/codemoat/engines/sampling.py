"""Sampling for the batched llama.cpp engine (`engines.batch`): each generating sequence's next token from
its row of a step's logits, with its own parameters, logits processors (the watermark stays per request)
and stop strings.

The step's logits are one numpy view of the context's output buffer (`llama_get_logits`: a row per
output, in batch order); logits processors rewrite their row in place (a sampler chain reads the same
buffer), plain greedy rows take one `argmax` for all, and each answer takes its token (`engines.pieces`).
A request's sampler chain is built as llama-cpp-python's `generate` builds it; plain greedy has none.
"""

from __future__ import annotations

import ctypes
import hashlib
import random
from typing import Any

import numpy as np

from .base import RANDOM_SEED, SamplingParams
from .slots import Seq

PENALTY_LAST_N = 64  # llama-cpp-python's `last_n_tokens_size`: the window repeat_penalty looks at


def llama_seed(seed: int | None) -> int:
    """The uint32 llama.cpp's sampler takes for a request's seed (below 2**64, `Service.params`): one below 2**32 - 1
    as it is (as llama-server takes it), a larger one hashed to 32 bits, None a random one. ctypes kept a seed's low
    32 bits, so seeds 1 and 2**32 + 1 sampled alike, and 2**32 - 1 (or any seed ending in those bits) asked llama.cpp
    for a random seed: a seeded request that did not repeat."""
    if seed is None:
        return random.getrandbits(31)
    if 0 <= seed < RANDOM_SEED:
        return seed
    h = int.from_bytes(hashlib.blake2b((seed % (1 << 64)).to_bytes(8, "little"), digest_size=4).digest(), "little")
    return h if h != RANDOM_SEED else RANDOM_SEED - 1


class Sampling:
    """Mixed into `batch.Batcher`, which sets `lib`, `ctx`, `n_vocab`, `pieces` and `_views` (a dict), and
    gives `_finish(seq, reason)` and `_fail(seq, exc)`. Runs on the batcher's thread."""

    def _chain(self, p: SamplingParams) -> Any:
        """This request's llama.cpp sampler chain (as llama-cpp-python's `generate` builds it), or None
        for plain greedy, which is an argmax."""
        lib = self.lib
        greedy = p.temperature <= 0
        if greedy and p.repeat_penalty == 1.0:
            return None
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lambda s: lib.llama_sampler_chain_add(chain, s)  # noqa: E731
        if p.repeat_penalty != 1.0:
            add(lib.llama_sampler_init_penalties(self.n_vocab, PENALTY_LAST_N, p.repeat_penalty, 0.0, 0.0))
        if greedy:
            add(lib.llama_sampler_init_greedy())
        else:
            add(lib.llama_sampler_init_top_k(p.top_k))
            add(lib.llama_sampler_init_top_p(p.top_p, 1))
            add(lib.llama_sampler_init_temp(p.temperature))
            add(lib.llama_sampler_init_dist(llama_seed(p.seed)))
        return chain  # the penalty window holds generated tokens only, as in llama-cpp-python's `generate`

    def _logits(self, rows: int) -> np.ndarray:
        """The step's logits, `rows` × n_vocab: a view of the context's output buffer, made once per buffer
        address and row count. `np.ctypeslib.as_array` builds a ctypes array type on every call: ~5 µs, but
        ~55 µs right after a decode that streamed a 60 MB model through the caches, on every step. llama.cpp
        only ever grows that buffer (`output_reserve`: when it moves, the old views are dropped; at the same
        address they still fit), and after a decode it holds at least the step's rows with logits."""
        ptr = self.lib.llama_get_logits(self.ctx)  # called every step, as before: it also waits for the decode
        key = (ctypes.addressof(ptr.contents), rows)
        view = self._views.get(key)
        if view is None:
            if any(k[0] != key[0] for k in self._views):
                self._views.clear()
            view = self._views[key] = np.ctypeslib.as_array(ptr, shape=(rows, self.n_vocab))
        return view

    def _sample(self, seqs: list[Seq]) -> None:
        """Sample the next token of every sequence whose row had logits in this step: the logits are one
        view of the context's output buffer; logits processors rewrite their row in place (a sampler
        chain reads the same buffer), then one `argmax` serves every plain greedy row."""
        lib = self.lib
        logits = self._logits(len(seqs))
        plain = []
        for s in seqs:
            try:
                if s.want_logits:
                    s.result = logits[s.out].astype(np.float32, copy=True)
                    self._finish(s, "length")
                    continue
                row = logits[s.out]
                for proc in s.params.logits_processors:
                    out = proc(s.history, row)
                    if out is not row:
                        row[:] = out
                if s.chain is None:
                    plain.append(s)
                else:
                    self._accept(s, int(lib.llama_sampler_sample(s.chain, self.ctx, s.row)))
            except Exception as e:
                self._fail(s, e)
        if plain:
            best = logits.argmax(axis=1) if len(plain) == len(seqs) else None
            for s in plain:
                try:
                    self._accept(s, int(best[s.out] if best is not None else logits[s.out].argmax()))
                except Exception as e:
                    self._fail(s, e)

    def _accept(self, s: Seq, tok: int) -> None:
        s.history.append(tok)
        s.next_token = tok
        reason = self.pieces.take(s, tok)
        if reason is not None:
            self._finish(s, reason)
