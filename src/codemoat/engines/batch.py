"""Continuous batching for the llama.cpp engine: many requests share one llama.cpp context.

One context holds `parallel` sequence slots (`n_seq_max`, one KV stream per slot: `kv_unified`
off, as `llama-server -np N` runs). The engine's worker thread runs `Batcher.run`: each step it

1. admits waiting requests into free slots (`engines.slots`: a request takes the slot whose cached
   tokens share the longest prefix of its prompt and keeps that prefix's KV cells);
2. makes ONE `llama_batch` (each token with its `seq_id` and position), in slot order: the next
   token of every generating sequence, and up to `batch_tokens` prompt tokens of sequences still
   reading their prompt (chunked prefill, so a long prompt does not stall everyone's next token;
   a chunk ends on a multiple of ALIGN unless the prompt ends first), and evaluates it in one
   `llama_decode` call: the weights are read once per step for everyone's rows;
3. samples each generating sequence with its own parameters, logits processors (the watermark
   stays per request) and stop strings (`worker.StopCutter`): the step's logits are one numpy view
   (`llama_get_logits`: a row per output, in batch order), plain greedy rows take one `argmax` for
   all, and each answer takes its token (`engines.sampling`, `engines.pieces`); `after_step` is then called
   once (the engine process sends the step's chunks of every request as one message: `engines.child`).

A request whose `SamplingParams.queue_deadline` passes while it waits for a slot ends with
`Overloaded` (`server.max_queue_wait_s`: the protocol's overloaded error, 503), never taking a slot.

Results do not depend on the batch bit for bit: ggml picks its matmul kernel by a ubatch's row
count (one row, or a multiple of 4 rows on repacked quantised weights), so a logit can move by
~1e-3 with what else was in the step or in the cache. Greedy answers were the same batched, alone
and on the one-at-a-time engine in every test (tests/engines/test_batching.py); the one-at-a-time
engine alone keeps the stricter "same prompt, same logits" (`LlamaCppEngine._eval_aligned`).

llama.cpp applies LoRA adapters per context, not per sequence, so requests with different
adapters never share a step: a request for another adapter waits (and holds back the requests
behind it) until the running ones end, then the context switches adapter. The slots keep their KV
cells across a switch, but a cached prefix is reused only under the adapter set it was computed
under (`engines.slots`).
"""

from __future__ import annotations

import ctypes
import logging
import queue
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import CodemoatError, Overloaded
from .base import FinishReason
from .pieces import Pieces
from .sampling import Sampling
from .slots import Seq, Slots
from .worker import StopCutter, late

log = logging.getLogger("codemoat.engines")
ALIGN = 32  # prompt chunks: this many tokens, aligned to position 0 (as `llamacpp.ALIGN`)


class _Batch:
    """A `llama_batch` whose arrays numpy owns (one seq id per token)."""

    def __init__(self, lib: Any, capacity: int):
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        base = self.seq.ctypes.data
        self._ptrs = (ctypes.POINTER(ctypes.c_int32) * capacity)(
            *(ctypes.cast(base + 4 * i, ctypes.POINTER(ctypes.c_int32)) for i in range(capacity))
        )
        b = lib.llama_batch()
        b.token = self.token.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.embd = None
        b.pos = self.pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(self._ptrs, ctypes.POINTER(ctypes.POINTER(ctypes.c_int32)))
        b.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.struct = b
        self.capacity = capacity


class Batcher(Sampling):
    """The scheduler and the batched llama.cpp context (see the module docstring). Runs on one thread."""

    def __init__(
        self,
        engine: Any,
        *,
        parallel: int,
        slot_ctx: int,
        batch_tokens: int,
        n_threads: int,
        loras: dict[str, Any],
    ):
        import llama_cpp as lib

        self.lib, self.engine, self.loras = lib, engine, loras
        self.parallel, self.batch_tokens = parallel, max(batch_tokens, ALIGN)
        # a step's rows: the prefill budget, one chunk's overrun to its ALIGN boundary, and a token per slot
        # (a generating sequence's next one, or the last of a prompt read to its end)
        capacity = self.batch_tokens + ALIGN + 2 * parallel
        self.n_vocab = engine._llm.n_vocab()
        cp = lib.llama_context_default_params()
        cp.n_ctx = slot_ctx * parallel
        cp.n_batch = cp.n_ubatch = capacity
        cp.n_seq_max = parallel
        # a KV stream per slot, as `llama-server -np N`: a sequence attends over its own cells only
        # (a unified buffer makes every row attend over every slot's cells, masked: a cost that grows with
        # all slots' prompts). llama.cpp splits such a batch into ubatches of consecutive slot ids with
        # equally many rows each (one more ubatch per gap between busy slots), which is why rows go in slot order.
        cp.kv_unified = False
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as the one-at-a-time engine
        cp.no_perf = True
        self.ctx = lib.llama_init_from_model(engine._llm._model.model, cp)
        if not self.ctx:
            raise CodemoatError(f"llama.cpp could not make a context of {parallel} slots × {slot_ctx} tokens")
        self.slot_ctx = min(slot_ctx, int(lib.llama_n_ctx_seq(self.ctx)))
        self.mem = lib.llama_get_memory(self.ctx)
        self.batch = _Batch(lib, cp.n_batch)
        self.slots = Slots(lib, self.mem, parallel)
        self.waiting: deque[Seq] = deque()
        self.active: list[Seq] = []
        self.adapter: str | None = None
        self.on_slots: Callable[[dict[str, int]], None] | None = None
        self.after_step: Callable[[], None] | None = None  # called after each turn of the loop (engines.child)
        #: called first in each turn of the loop with whether the batch is idle: the engine process's reader of
        #: the server's socket, on this thread (`engines.child`); it waits for a message or a job when idle,
        #: and returns False once the server said stop or went away
        self.inbox: Callable[[bool], bool] | None = None
        self.on_end: Callable[[], None] | None = None  # called as `run` ends, however it ends (engines.child)
        self.steps = 0
        self.pieces = Pieces(lib, engine._vocab)
        self._views: dict[tuple[int, int], np.ndarray] = {}  # (logits buffer address, rows) -> its view (`_logits`)

    # -- facts -------------------------------------------------------------------
    @property
    def reused_tokens(self) -> int:
        """Prompt tokens whose KV cells a slot already held (prefix reuse)."""
        return self.slots.reused_tokens

    def usage(self) -> dict[str, int]:
        return {"total": self.parallel, "busy": len(self.active), "waiting": len(self.waiting)}

    def _changed(self) -> None:
        if self.on_slots is not None:
            self.on_slots(self.usage())

    # -- the loop ------------------------------------------------------------------
    def run(self, jobs: queue.SimpleQueue) -> None:
        """Take requests from `jobs` (a `Seq`, a `(fn, future)` job, or None to stop) and step until stopped."""
        try:
            self._run(jobs)
        finally:
            if self.on_end is not None:
                self.on_end()

    def _run(self, jobs: queue.SimpleQueue) -> None:
        while True:
            idle = not self.active and not self.waiting
            inbox = self.inbox
            if inbox is not None:  # the server's messages, read here: `_start` puts a request in `jobs`
                try:
                    keep = inbox(idle)
                except BaseException:  # the reading ends (the engine process then stops), never the loop
                    log.exception("reading the server's messages failed")
                    keep = False
                if not keep:
                    self.inbox = None
            try:
                item = jobs.get() if idle and inbox is None else jobs.get_nowait()
                while True:
                    if item is None:
                        self._stop()
                        if self.after_step is not None:
                            self.after_step()
                        return
                    if isinstance(item, Seq):
                        self.waiting.append(item)
                    else:
                        fn, fut = item
                        if fut.set_running_or_notify_cancel():
                            try:
                                fut.set_result(fn())
                            except BaseException as e:
                                fut.set_exception(e)
                    item = jobs.get_nowait()
            except queue.Empty:
                pass
            before = (len(self.active), len(self.waiting))
            self._admit()
            if before != (len(self.active), len(self.waiting)):
                self._changed()
            if self.active:
                self._step()
            if self.after_step is not None:
                self.after_step()

    def _stop(self) -> None:
        for s in list(self.active) + list(self.waiting):
            s.finished(self.engine.closed_error())
        self.active, self.waiting = [], deque()
        for s in self.slots.all:
            if s.seq is not None and s.seq.chain is not None:
                self.lib.llama_sampler_free(s.seq.chain)
            s.seq = None

    def close(self) -> None:
        """Free the context (after `run` returned)."""
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None

    # -- admission -------------------------------------------------------------------
    def _admit(self) -> None:
        gone = [s for s in self.waiting if s.cancel.is_set() or late(s.params)]  # their clients left, or waited too long
        if gone:
            self.waiting = deque(s for s in self.waiting if s not in gone)
            for s in gone:
                s.finished(None if s.cancel.is_set() else Overloaded())
        while self.waiting:
            free = self.slots.free()
            if not free:
                return
            at = self._next()
            seq = self.waiting[at]
            want = None if seq.want_logits else seq.params.adapter
            if want != self.adapter:
                if self.active:
                    return  # adapters are per context: wait until the running requests end
                try:
                    self._set_adapter(want)
                except Exception as e:  # this request fails; an exception here would end the loop, and every request with it
                    del self.waiting[at]
                    seq.finished(e)
                    continue
            del self.waiting[at]
            try:
                self._start(seq, free)
            except Exception as e:
                seq.finished(e)

    def _next(self) -> int:
        """The waiting request to admit next: the first of those whose user (`cache_key`) holds the fewest
        slots, so that one user's many requests cannot keep everyone else's waiting until they all end."""
        if len(self.waiting) == 1:
            return 0
        held = Counter(s.params.cache_key for s in self.active)
        return min(range(len(self.waiting)), key=lambda i: held[self.waiting[i].params.cache_key])  # the first among equals

    def _set_adapter(self, name: str | None) -> None:
        lib = self.lib
        if name is not None and name not in self.loras:
            raise CodemoatError(f"no adapter named {name!r} is loaded")
        if name is None:
            rc = lib.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            rc = lib.llama_set_adapters_lora(
                self.ctx, (lib.llama_adapter_lora_p_ctypes * 1)(self.loras[name]), 1, (ctypes.c_float * 1)(1.0)
            )
        if rc != 0:  # back to the base model, whatever llama.cpp left set
            lib.llama_set_adapters_lora(self.ctx, None, 0, None)
            name = None
        # the slots' cells stay: `_start` reuses a prefix only under the set it was computed under
        self.adapter = name
        if rc != 0:
            raise CodemoatError(f"llama.cpp refused the adapter (code {rc})")

    def _start(self, seq: Seq, free: list[int]) -> None:
        p = seq.params
        k = self.slots.claim(seq, free, self.adapter)
        seq.pos, seq.n_past = k, k
        seq.phase = "prefill" if k < len(seq.ids) - 1 else "decode"
        seq.next_token = seq.ids[-1]
        seq.history = list(seq.ids)
        seq.cutter = StopCutter(p.stop, seq.emit, p.n_indent, p.time_limit_ms)
        seq.cutter.cached = k
        if not seq.want_logits:
            seq.chain = self._chain(p)
        self.active.append(seq)

    # -- a step ---------------------------------------------------------------------
    def _decode(self, n: int) -> int:
        self.batch.struct.n_tokens = n
        return int(self.lib.llama_decode(self.ctx, self.batch.struct))

    def _put(self, row: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b = self.batch
        b.token[row], b.pos[row], b.seq[row], b.logits[row] = token, pos, seq_id, logits

    def _step(self) -> None:
        """One `llama_decode`: the next token of every generating sequence and a share of the prompts
        being read (the oldest first), in slot order; then each sequence whose row has logits samples."""
        self.steps += 1
        for s in [s for s in self.active if s.cancel.is_set()]:
            self._finish(s, "cancelled")
        decoding = [s for s in self.active if s.phase == "decode"]
        budget, ends = self.batch_tokens - len(decoding), {}
        for s in self.active:
            if s.phase != "prefill":
                continue
            if budget <= 0 and ends:
                break
            n = len(s.ids) - 1
            end = min(n, s.pos + max(budget, 1))
            if end < n:  # a chunk ends on a multiple of ALIGN: at least the next one, at most the budget's last
                end = min(n, max(end // ALIGN * ALIGN, (s.pos // ALIGN + 1) * ALIGN))
            ends[s.slot] = end
            budget -= end - s.pos
        rows = sorted(decoding + [s for s in self.active if s.slot in ends], key=lambda s: s.slot)
        r = 0
        for s in rows:
            if s.phase == "prefill":
                end = ends[s.slot]
                b, m = self.batch, end - s.pos
                b.token[r : r + m] = s.ids[s.pos : end]
                b.pos[r : r + m] = np.arange(s.pos, end, dtype=np.int32)
                b.seq[r : r + m] = s.slot
                b.logits[r : r + m] = 0
                r += m
                if end < len(s.ids) - 1:
                    continue
                s.n_past = end  # the prompt's last token is read in this step too: its logits give the first token
            self._put(r, s.next_token, s.n_past, s.slot, True)
            s.row, r = r, r + 1
        rc = self._decode(r)
        sampling: list[Seq] = []
        for s in rows:
            if rc != 0:
                self._fail(s, CodemoatError(f"llama.cpp could not decode the batch (code {rc})"))
                continue
            slot = self.slots[s.slot]
            if s.phase == "prefill":
                end = ends[s.slot]
                slot.cached.extend(s.ids[s.pos : end])
                s.pos = s.n_past = end
                if end < len(s.ids) - 1:
                    continue
                s.phase = "decode"
            slot.cached.append(s.next_token)
            s.n_past += 1
            s.out = len(sampling)  # outputs come in batch order, one per row with logits
            sampling.append(s)
        if sampling:
            self._sample(sampling)

    def _release(self, s: Seq) -> None:
        if s in self.active:
            self.active.remove(s)
        self.slots.release(s.slot)
        if s.chain is not None:
            self.lib.llama_sampler_free(s.chain)
            s.chain = None
        self._changed()

    def _finish(self, s: Seq, reason: FinishReason) -> None:
        self._release(s)
        if not s.want_logits and s.cutter is not None:
            try:
                s.cutter.finish(reason)
            except Exception as e:  # an emit that failed: the request is over either way
                s.finished(e)
                return
        s.finished(None)

    def _fail(self, s: Seq, exc: BaseException) -> None:
        """End `s` with an error; its slot's cells are not trusted again."""
        self._release(s)
        self.slots.forget(s.slot)
        s.finished(exc)
