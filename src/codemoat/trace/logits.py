"""A model's next-token distributions over a text, a batch of positions at a time (llama.cpp).

`logits_all=True` keeps n_ctx × |V| float32 logits (1 GiB for 1,024 positions of a 262k-token
vocabulary) and copies them again into `Llama.scores`. Here the context keeps no logits of its own:
each `llama_decode` of `n_batch` tokens asks for the logits of every position in the batch, the
caller reduces them (to entropies, to a KL) while they sit in llama.cpp's output buffer, and the
next batch overwrites them. Memory is n_batch × |V| floats whatever the text's length; decoding
runs on every core this process may use.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..cores import usable_cores

BATCH = 64  # positions per decode: 64 × 262,144 × 4 B = 64 MiB of logits for Gemma 3


def threads() -> int:
    """Cores this process may run on."""
    return usable_cores()


class LogitStream:
    """Per-position logits of a GGUF model, `BATCH` positions at a time."""

    def __init__(self, model_path: str, n_ctx: int = 1024, n_batch: int = BATCH, n_threads: int | None = None):
        from ..engines.llamacpp import load_llama

        n = n_threads or threads()
        self.llm = load_llama(
            str(model_path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, logits_all=False, n_threads=n, n_threads_batch=n
        )
        self.n_ctx, self.n_batch, self.n_vocab = self.llm.n_ctx(), self.llm.n_batch, self.llm.n_vocab()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8", "replace"), add_bos=False, special=False)

    def blocks(self, ids: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(t, L): L[j] (float32, |V|) are the logits for the token after ids[t + j], given ids[w..t+j]
        where w starts the n_ctx window; a view into llama.cpp's buffer, valid until the next block."""
        import llama_cpp

        llm = self.llm
        for w in range(0, len(ids), self.n_ctx):  # windows of n_ctx, each starting afresh
            window = ids[w : w + self.n_ctx]
            llm.reset()
            llm._ctx.kv_cache_clear()
            for b in range(0, len(window), self.n_batch):
                chunk = window[b : b + self.n_batch]
                llm._batch.set_batch(batch=chunk, n_past=b, logits_all=True)
                llm._ctx.decode(llm._batch)
                ptr = llama_cpp.llama_get_logits(llm._ctx.ctx)
                yield w + b, np.ctypeslib.as_array(ptr, shape=(len(chunk), self.n_vocab))

    def close(self) -> None:
        self.llm.close()


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (a new array)."""
    y = x - x.max(axis=-1, keepdims=True)
    y -= np.log(np.exp(y).sum(axis=-1, keepdims=True))
    return y


def entropies(x: np.ndarray) -> np.ndarray:
    """Row-wise Shannon entropy (nats) of softmax(x), float32, one temporary of x's size."""
    y = x - x.max(axis=-1, keepdims=True)
    e = np.exp(y)
    z = e.sum(axis=-1)
    np.multiply(e, np.where(np.isfinite(y), y, 0.0), out=e)
    return np.maximum(0.0, np.log(z) - e.sum(axis=-1) / z)
