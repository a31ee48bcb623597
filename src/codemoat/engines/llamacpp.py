"""The embedded default engine: llama.cpp in-process (llama-cpp-python), from a path or a sealed memfd.

One worker thread owns the `Llama` object (a llama.cpp context is not thread-safe); requests
queue for it, and each generation checks its cancel flag between tokens, so a client that
disconnects frees the worker at once. The KV cache keeps the longest common prompt prefix
between requests (llama-cpp-python's `generate` prefix match), which is what makes repeated
completions in one file cheap.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..cores import usable_cores
from ..errors import CodemoatError
from .base import Chunk, FinishReason, SamplingParams
from .memfd import MemfdBuffer
from .batch import ALIGN, Batcher, Seq
from .llamaload import load_llama, load_vocab, training_context
from .llamavocab import NativeVocab
from .pieces import valid_utf8_prefix as _valid_utf8_prefix
from .sampling import llama_seed
from .worker import StopCutter, WorkerEngine

log = logging.getLogger("codemoat.engines")


class LlamaCppEngine(NativeVocab, WorkerEngine):
    name = "llamacpp"
    # llama.cpp's CPU "extra buffer types" (AMX, repacked kernels) off: correct on any x86-64 CPU
    safe_options = {"use_extra_bufts": False}
    isolatable = True

    def __init__(
        self,
        model_path: str,
        *,
        model_id: str | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        memfd: MemfdBuffer | None = None,
        n_batch: int = 512,
        cpu_buffers: str = "auto",
        use_extra_bufts: bool | None = None,
        adapters: dict[str, str] | None = None,
        parallel: int = 1,
        batch_tokens: int = 512,
        use_mmap: bool = True,
        progress=None,
        fold_adapters: bool = False,
    ):
        """`cpu_buffers` ("auto", "extra", "safe") picks llama.cpp's CPU buffer types (`cpu.choose`);
        `use_extra_bufts` given as a bool overrides it (a supervisor falling back to the safe path).
        `parallel` > 1 batches: that many requests decode together in one context of `parallel` slots
        of `n_ctx` tokens each (`engines.batch`), with up to `batch_tokens` prompt tokens per step;
        1 decodes one request at a time, each to its end. `use_mmap` False copies the weights in (read
        with a `progress` callback that may block: engines.overlap). `fold_adapters`: each adapter
        that can be is folded into its own in-memory copy of the weights and served by an engine of its
        own at the base's speed (engines.merge); the others are applied by llama.cpp at run time."""
        import llama_cpp

        from .cpu import Choice, choose

        self._memfd = memfd
        self._users, self._users_cv = 0, threading.Condition()  # server threads in the native model (`_hold`)
        n_threads = n_threads or usable_cores()
        if use_extra_bufts is None:
            self.cpu = choose(cpu_buffers, model_path, n_threads=n_threads)
        else:
            self.cpu = Choice(use_extra_bufts, f"use_extra_bufts={use_extra_bufts} given by the engine's caller")
        self._batcher: Batcher | None = None
        self._llm = load_llama(
            model_path,
            model_id or model_path,
            use_extra_bufts=self.cpu.use_extra_bufts,
            # batched, this context only holds the model: the requests' KV cells are the batcher's
            n_ctx=n_ctx if parallel <= 1 else 2 * ALIGN,
            n_batch=n_batch,
            n_threads=n_threads,
            n_threads_batch=n_threads,  # else llama-cpp-python evaluates prompts on every core, whatever model.n_threads says
            n_gpu_layers=n_gpu_layers,
            use_mmap=use_mmap,
            progress=progress,
        )
        self.model_id = model_id or Path(model_path).stem
        self._lib = llama_cpp
        self._vocab = self._llm._model.vocab
        self._special_cache: dict[str, bool] = {}
        self._loras: dict[str, Any] = {}
        self._lora_active: str | None = None
        self._folded: dict[str, LlamaCppEngine] = {}
        if fold_adapters and adapters:
            from .merge import fold_into_engines

            kw = dict(model_id=self.model_id, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, parallel=parallel)
            kw.update(batch_tokens=batch_tokens, use_extra_bufts=self.cpu.use_extra_bufts)
            self._folded = fold_into_engines(model_path, adapters, lambda buf: LlamaCppEngine.from_memfd(buf, **kw))
        for name, lora_path in (adapters or {}).items():  # sealed adapters, each from a memfd (engines.adapters)
            if name in self._folded:
                continue
            ptr = llama_cpp.llama_adapter_lora_init(self._llm._model.model, lora_path.encode())
            if not ptr:
                raise CodemoatError(f"adapter {name!r} does not fit model {self.model_id}")
            self._loras[name] = ptr
        if parallel > 1:
            slot_ctx = min(n_ctx, training_context(self._llm.metadata, n_ctx))
            self._batcher = Batcher(
                self, parallel=parallel, slot_ctx=slot_ctx, batch_tokens=batch_tokens, n_threads=n_threads, loras=self._loras
            )
        self._start_worker(f"llamacpp-{self.model_id}")

    @property
    def _model(self):
        """The native model; using it after `close()` would crash the process, so it is refused."""
        if self._closed:
            raise self.closed_error()
        return self._llm

    # -- construction -----------------------------------------------------
    @classmethod
    def from_path(cls, path: str | Path, **kw: Any) -> LlamaCppEngine:
        p = Path(path)
        if not p.is_file():
            raise CodemoatError(f"model file not found: {p}")
        kw.setdefault("model_id", p.stem)
        return cls(str(p), **kw)

    @classmethod
    def from_memfd(cls, buf: MemfdBuffer, **kw: Any) -> LlamaCppEngine:
        """Load from plaintext held in a sealed memfd; `close()` zeroes and frees it."""
        overlapped = getattr(buf, "load_overlapped", None)
        if overlapped is not None:  # still being decrypted: llama.cpp reads behind the decryptor (engines.overlap)
            return overlapped(lambda **extra: cls(buf.path, memfd=buf, **kw, **extra))
        if not buf.sealed:
            buf.seal()
        return cls(buf.path, memfd=buf, **kw)

    @classmethod
    def from_buffer(cls, buf: MemfdBuffer, parts: Any = None, **kw: Any) -> LlamaCppEngine:
        """A decrypted GGUF in `buf` (the `Engine` contract; a GGUF is one part)."""
        if parts and not any(name.endswith(".gguf") for name in parts):
            buf.close(zero=True)
            raise CodemoatError(
                f"the llamacpp engine serves GGUF files, and this model holds {', '.join(parts)}: "
                'serve it with model.engine = "transformers"'
            )
        return cls.from_memfd(buf, **kw)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, **kw: Any) -> LlamaCppEngine:
        """Load a GGUF held in memory: copied into a sealed memfd, never written to a disk path."""
        return cls.from_memfd(MemfdBuffer.from_bytes(data), **kw)

    @classmethod
    def front(cls, path: str, *, model_id: str | None = None, **_: Any) -> LlamaCppEngine:
        """Tokenizer and metadata only (a vocab-only llama: no weights, no worker), for the server
        side of a supervised engine; generating with it is refused."""
        import llama_cpp

        eng = cls.__new__(cls)
        eng._memfd, eng._closed, eng._front = None, False, True
        eng._users, eng._users_cv = 0, threading.Condition()
        eng._llm = load_vocab(path, model_id or path)
        eng.model_id = model_id or Path(path).stem
        eng._lib, eng._vocab, eng._special_cache = llama_cpp, eng._llm._model.vocab, {}
        return eng

    # -- facts --------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        """Context length of one request (a batched engine's slot)."""
        if getattr(self, "_batcher", None) is not None:
            return self._batcher.slot_ctx
        return self._model.n_ctx()

    @property
    def n_vocab(self) -> int:
        return self._model.n_vocab()

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._model.metadata)

    # -- generation ---------------------------------------------------------
    def _work(self) -> None:
        if self._batcher is None:
            super()._work()
        else:
            self._batcher.run(self._jobs)

    def _start(self, ids, params, emit, cancel, finished) -> None:  # type: ignore[no-untyped-def]
        folded = getattr(self, "_folded", {}).get(params.adapter) if params.adapter else None
        if folded is not None:  # the adapter is in that engine's weights: it serves the request as its base
            return folded._start(ids, dataclasses.replace(params, adapter=None), emit, cancel, finished)
        if self._batcher is None:
            return super()._start(ids, params, emit, cancel, finished)
        if self._closed:
            raise self.closed_error()
        self._jobs.put(Seq(list(ids), params, emit, cancel, self._owing(cancel, finished)))

    @property
    def reads_on_loop(self) -> bool:
        """Whether the engine process may read its socket on this engine's batch loop (`read_on_loop`): a batching
        engine without folded adapters (their requests go to their own engines' loops: a request or a cancel for
        one would wait for this loop's step)."""
        return self._batcher is not None and not getattr(self, "_folded", None) and not self._closed

    def read_on_loop(self, inbox: Callable[[bool], bool], ended: Callable[[], None]) -> None:
        """Have the batch loop call `inbox(idle)` first in each turn (`Batcher.inbox`, when `reads_on_loop`): the
        engine process reads the server's socket there, so a request reaches the loop without a hand-off between
        threads (waking a thread cost ~0.05 ms before each first token on a 2-core VM). `inbox` waits, when idle,
        on the job queue's eventfd (`Jobs.waker`) as well as on the socket. `ended()` is called on the loop's thread
        as the loop ends, however it ends."""
        assert self._batcher is not None
        self._batcher.on_end = ended
        if not self._worker.is_alive():  # it ended before it could be told
            ended()
        self._batcher.inbox = inbox
        self.probe()  # a job that does nothing: it wakes the loop blocked in `get`, which then reads

    def step_counter(self):  # type: ignore[no-untyped-def]
        """The batch's steps (`llama_decode` calls) so far, for the inline watchdog (batched only)."""
        batcher = self._batcher
        return (lambda: batcher.steps) if batcher is not None else None

    @property
    def on_slots(self):  # type: ignore[no-untyped-def]
        """Called on the worker with `slots()` whenever a slot is taken or freed (batched only)."""
        return self._batcher.on_slots if self._batcher is not None else None

    @on_slots.setter
    def on_slots(self, fn) -> None:  # type: ignore[no-untyped-def]
        if self._batcher is not None:
            self._batcher.on_slots = fn

    @property
    def batches(self) -> bool:
        """Whether requests decode together (`model.parallel` > 1): `engines.batch`."""
        return getattr(self, "_batcher", None) is not None

    @property
    def after_step(self):  # type: ignore[no-untyped-def]
        """Called on the worker after each step of the batch (batched only; the engine process sends the
        step's chunks then): also for the engines serving folded adapters."""
        return self._batcher.after_step if self._batcher is not None else None

    @after_step.setter
    def after_step(self, fn) -> None:  # type: ignore[no-untyped-def]
        if self._batcher is not None:
            self._batcher.after_step = fn
        for folded in getattr(self, "_folded", {}).values():
            folded.after_step = fn

    def slots(self) -> dict[str, int]:
        """Slot use: total, busy, and requests waiting for one (one-at-a-time: one slot)."""
        if self._batcher is not None:
            return self._batcher.usage()
        return {"total": 1, "waiting": self.queued}

    def _generate(
        self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Chunk], None], cancel: threading.Event
    ) -> None:
        """Runs on the worker: sample tokens with llama.cpp's sampler chain, cut at stop strings."""
        llm = self._model
        self._use_adapter(getattr(params, "adapter", None))
        if params.cache_key != getattr(self, "_cache_owner", None):  # another user's cached prompt is not reused
            self._aligned = 0
            llm.reset()
            self._cache_owner = params.cache_key
        llm.set_seed(llama_seed(params.seed))
        lp = self._lib.LogitsProcessorList(list(params.logits_processors)) if params.logits_processors else None
        cutter = StopCutter(params.stop, emit, params.n_indent, params.time_limit_ms)
        raw = b""
        n = 0
        reason: FinishReason = "length"
        cutter.cached = self._eval_aligned(prompt_ids, reproducible=params.temperature <= 0 or params.seed is not None)
        gen = llm.generate(
            prompt_ids,
            top_k=params.top_k if params.temperature > 0 else 1,
            top_p=params.top_p,
            min_p=0.0,
            temp=max(params.temperature, 0.0),
            repeat_penalty=params.repeat_penalty,
            logits_processor=lp,
        )
        try:
            for tok in gen:
                if cancel.is_set():
                    reason = "cancelled"
                    break
                if self._lib.llama_vocab_is_eog(self._vocab, tok):
                    reason = "stop"
                    break
                n += 1
                if self._lib.llama_vocab_is_control(self._vocab, tok):
                    # a control token is never text: <|fim_middle|> must not appear in an answer; one
                    # that a stop string names (<|file_sep|>, <end_of_turn>) ends the answer
                    if self.piece(tok, True).decode("utf-8", "replace") in params.stop:
                        reason = "stop"
                        break
                    if cutter.feed(raw[: _valid_utf8_prefix(raw)].decode("utf-8", "replace"), tok):
                        reason = "stop"
                        break
                    if n >= params.max_tokens:
                        break
                    continue
                raw += self.piece(tok)
                if cutter.feed(raw[: _valid_utf8_prefix(raw)].decode("utf-8", "replace"), tok):
                    reason = "stop"
                    break
                if n >= params.max_tokens:
                    break
        finally:
            gen.close()
        cutter.finish(reason)

    def _use_adapter(self, name: str | None) -> None:
        """Runs on the worker: this request's LoRA adapter (None: the base) on the context, through
        llama.cpp's per-context adapter set. The KV cache was computed under the previous set, so a
        change empties it: no token of one adapter's cache is reused under another."""
        if name == self._lora_active:
            return
        if name is not None and name not in self._loras:
            raise CodemoatError(f"no adapter named {name!r} is loaded")
        lib, ctx = self._lib, self._model._ctx.ctx
        if name is None:
            rc = lib.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            rc = lib.llama_set_adapters_lora(
                ctx, (lib.llama_adapter_lora_p_ctypes * 1)(self._loras[name]), 1, (ctypes.c_float * 1)(1.0)
            )
        if rc != 0:
            raise CodemoatError(f"llama.cpp refused adapter {name!r} (code {rc})")
        self._aligned = 0
        self._model.reset()
        self._lora_active = name

    def _eval_aligned(self, ids: list[int], reproducible: bool = True) -> int:
        """For a `reproducible` request (greedy, or seeded), evaluate all but the last prompt token in
        chunks of ALIGN tokens aligned to position 0, reusing only cached positions that such a chunk
        computed. llama.cpp's results for a position depend on the batch it was evaluated in: reusing
        a cached prefix of any length changed the split, and greedy answers with it (logits moved by
        up to 1.14 on Gemma 3 270M). This way the same prompt gives the same logits whatever came
        before. Cost: up to ALIGN - 1 cached tokens evaluated again (bench/results/prompts.md). Other
        requests reuse any cached prefix (llama-cpp-python's `generate`), and the positions they
        compute stop counting as aligned. Returns how many of the prompt's tokens it kept from the cache."""
        llm = self._model
        body = ids[:-1]
        cached = llm._input_ids
        same = 0
        limit = min(len(cached), len(body))
        while same < limit and cached[same] == body[same]:
            same += 1
        aligned = getattr(self, "_aligned", 0)
        if not reproducible:
            self._aligned = min(aligned, same) // ALIGN * ALIGN
            return same  # llama-cpp-python's `generate` reuses the common prefix
        start = min(same, aligned) // ALIGN * ALIGN
        llm.n_tokens = start  # eval() drops the cache from here
        for i in range(start, len(body), ALIGN):
            llm.eval(body[i : i + ALIGN])
        self._aligned = len(body) // ALIGN * ALIGN  # positions computed by whole aligned chunks
        return start

    def logits(self, prompt: str) -> np.ndarray:
        """Next-token logits after `prompt` (float32 copy)."""
        ids = self.tokenize(prompt)
        self.check_count(len(ids), 0)  # not empty (eval() of nothing leaves stale logits), fits the context
        if self._batcher is not None:
            from concurrent.futures import Future

            fut: Future = Future()
            seq = Seq(ids, SamplingParams(max_tokens=0, temperature=0), lambda c: None, threading.Event(), None, want_logits=True)  # type: ignore[arg-type]
            seq.finished = lambda e: fut.set_exception(e) if e is not None else fut.set_result(seq.result)
            self._jobs.put(seq)
            return fut.result()

        def run() -> np.ndarray:
            self._use_adapter(None)
            self._aligned = 0
            self._model.reset()
            self._model.eval(ids)
            arr = np.ctypeslib.as_array(self._model._ctx.get_logits(), shape=(self.n_vocab,))
            out = arr.astype(np.float32, copy=True)
            self._model.reset()
            return out

        return self._submit(run).result()

    def health(self) -> dict[str, Any]:
        return {
            **super().health(),
            "queue": self.queued,
            "sealed": self._memfd is not None,
            "cpu_buffers": self.cpu.health(),
            "slots": self.slots(),
        }

    def close(self) -> None:
        if getattr(self, "_front", False):  # no worker to stop
            if not self._closed:
                self._closed = True
                self._free_model()
            return
        if not self._stop_worker():
            return
        for folded in getattr(self, "_folded", {}).values():
            folded.close()
        if self._worker.is_alive():  # stalled (the inline watchdog), maybe inside llama.cpp: freeing under it would crash
            log.error(
                "the engine's worker for %s is still running: its model stays in memory until the process exits", self.model_id
            )
            if self._memfd is not None:
                self._memfd.close(zero=True)
                self._memfd = None
            return
        if self._batcher is not None:
            self._batcher.close()
        self._free_model()
        if self._memfd is not None:
            self._memfd.close(zero=True)
            self._memfd = None
