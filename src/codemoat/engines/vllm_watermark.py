"""The output watermark inside vLLM: one logits processor registered at start-up, keyed per request.

vLLM v1 takes no per-request logits processors. `WatermarkLogits` is registered when the engine
starts (`AsyncEngineArgs(logits_processors=[...])`, by qualified name so the spawned workers
import it) and applies codemoat's watermark (`trace.watermark`, Kirchenbauer et al. with SWEET's
entropy gate) to the requests whose `SamplingParams.extra_args[WATERMARK_ARG]` holds a key
(hex), leaving every other row of the batch untouched. Per step it is vectorised over the batch in
torch: one float32 entropy over the keyed rows (log Z - Σe·x/Z: one exp, no log-softmax), then for
the rows SWEET's gate opens only, δ·G(prev) added in place row by row. G(prev) comes from a bounded
cache of (key, prev) rows (one key serves a licence's every request, and code repeats its previous
tokens), else from one PRF call per key for all missing rows (AES from `trace`: the same green lists
as llama.cpp's `WatermarkProcessor`).

This is the V1 model runner's interface (`vllm.v1.sample.logits_processor.LogitsProcessor`).
vLLM's Model Runner V2 (its default on GPUs with Triton; it needs Triton, so CPUs run V1) loads
only processors of its own interface (`vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`:
`add_request`, `apply(logits, ctx)` over `ctx.expanded_idx_mapping`) and refuses this class at
start-up. That interface is not implemented here: it could not be run on this project's CPU-only
machines. So the engine pins the V1 runner (`pin_v1_runner`: `VLLM_USE_V2_MODEL_RUNNER=0` for the
server and the processes vLLM spawns, whatever the operator's environment said).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

WATERMARK_ARG = "codemoat_watermark_key"
QUALNAME = "codemoat.engines.vllm_watermark:WatermarkLogits"
#: vLLM's switch between its model runners (unset: V2 where Triton is, else V1)
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"

log = logging.getLogger("codemoat.engines")


def pin_v1_runner() -> None:
    """vLLM's V1 model runner, whose logits processor interface `WatermarkLogits` implements, for this
    process and the ones vLLM spawns from it (they inherit the environment): see the module's text."""
    asked = os.environ.get(RUNNER_ENV, "").strip()
    if asked not in ("", "0"):
        log.warning("%s=%s ignored: codemoat's watermark runs on vLLM's V1 model runner", RUNNER_ENV, asked)
    os.environ[RUNNER_ENV] = "0"


class WatermarkLogits(LogitsProcessor):
    """δ on green logits of keyed rows whose next-token entropy is at least τ (see the module's text)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        from ..trace.watermark import DELTA, ENTROPY_THRESHOLD, GAMMA

        self.device = device
        self.gamma, self.delta, self.tau = GAMMA, DELTA, ENTROPY_THRESHOLD
        vocab = None
        try:
            vocab = int(vllm_config.model_config.get_vocab_size())
        except AttributeError:
            pass
        self.vocab_size = vocab
        # batch row → (key hex, prompt token ids, output token ids: vLLM's live list)
        self.rows: dict[int, tuple[str, list[int] | None, list[int]]] = {}
        self._greens: dict[str, Any] = {}
        self._cache: dict[tuple[str, int], torch.Tensor] = {}  # (key, prev) → δ·G(prev), insertion-ordered
        self._cache_shape: tuple = ()
        self._cache_max = 0

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        key = (sampling_params.extra_args or {}).get(WATERMARK_ARG)
        if key is None:
            return
        try:
            ok = isinstance(key, str) and len(bytes.fromhex(key)) >= 16
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"extra_args[{WATERMARK_ARG!r}] must be a hex key of at least 16 bytes")

    def is_argmax_invariant(self) -> bool:
        return False  # it raises green logits, which can change the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for i in batch_update.removed:
            self.rows.pop(i, None)
        for i, params, prompt_ids, out_ids in batch_update.added:
            key = (params.extra_args or {}).get(WATERMARK_ARG) if params is not None else None
            if key:
                self.rows[i] = (key, prompt_ids, out_ids)
            else:
                self.rows.pop(i, None)
        for a, b, how in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if how == MoveDirectionality.SWAP and rb is not None:
                self.rows[a] = rb

    def _green(self, key: str):
        g = self._greens.get(key)
        if g is None:
            from ..trace.watermark import GreenList

            if len(self._greens) >= 64:
                self._greens.clear()
            g = self._greens[key] = GreenList(bytes.fromhex(key), self.gamma)
        return g

    def masks(self, key: str, prevs: list[int], width: int) -> torch.Tensor:
        """(len(prevs), width) bool: G(prev) of `key` over the first `width` tokens (one PRF call)."""
        g = self._green(key)
        n = -(-width // 8)
        blocks = torch.empty((len(prevs), n, 2), dtype=torch.int64)
        blocks[:, :, 0] = torch.tensor(prevs, dtype=torch.int64)[:, None]
        blocks[:, :, 1] = torch.arange(n, dtype=torch.int64)[None, :]
        raw = g.prf(memoryview(blocks.numpy()).cast("B"))
        vals = torch.frombuffer(bytearray(raw), dtype=torch.int16).view(len(prevs), n * 8)[:, :width]
        if g.limit <= 1 << 15:  # v < limit as an unsigned 16-bit value, read from its signed twin
            green = (vals >= 0) & (vals < g.limit)
        else:
            green = (vals.to(torch.int32) & 0xFFFF) < g.limit
        if self.vocab_size is not None and self.vocab_size < width:
            green[:, self.vocab_size :] = False  # padding rows of the output layer are never raised
        return green

    def _deltas(self, key: str, prevs: list[int], like: torch.Tensor) -> list[torch.Tensor]:
        """δ·G(prev) rows (in `like`'s dtype and device) for `prevs`, from a bounded cache: one key serves
        a licence's every request, and code repeats its previous tokens (newlines, indents, brackets),
        so most steps need no AES and no conversion."""
        shape = (like.shape[1], like.dtype, like.device)
        if shape != self._cache_shape:
            self._cache.clear()
            self._cache_shape = shape
            self._cache_max = max(32, _CACHE_BYTES // max(1, like.shape[1] * like.element_size()))
        out: list[Any] = [self._cache.get((key, p)) for p in prevs]
        miss = [n for n, m in enumerate(out) if m is None]
        if miss:
            fresh = self.masks(key, [prevs[n] for n in miss], like.shape[1]).to(like.device, like.dtype) * self.delta
            for j, n in enumerate(miss):
                out[n] = self._cache[key, prevs[n]] = fresh[j]
            while len(self._cache) > self._cache_max:
                self._cache.pop(next(iter(self._cache)))  # first in, first out
        return out

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        idx, prevs, keys = [], [], []
        for i, (key, prompt_ids, out_ids) in self.rows.items():
            if i >= logits.shape[0]:
                continue
            last = out_ids[-1] if out_ids else (prompt_ids[-1] if prompt_ids else None)
            if last is None:
                continue  # nothing to key the green list on (llama.cpp's path skips an empty context too)
            idx.append(i)
            prevs.append(int(last))
            keys.append(key)
        if not idx:
            return logits
        hot = [idx[j] for j in (_entropy(logits, idx) >= self.tau).nonzero().flatten().tolist()]
        if not hot:  # SWEET's gate first: masks only where it opens
            return logits
        at = {i: j for j, i in enumerate(idx)}
        by_key: dict[str, list[int]] = {}
        for i in hot:
            by_key.setdefault(keys[at[i]], []).append(i)
        for key, rows in by_key.items():
            for i, d in zip(rows, self._deltas(key, [prevs[at[i]] for i in rows], logits)):
                logits[i].add_(d)  # in place, row by row: no batch-sized temporary
        return logits


#: the green-list cache's bound (float32 rows: 4|V| bytes each; 2,048 rows of an 8k vocabulary, 110 of 152k)
_CACHE_BYTES = 64 << 20


def _entropy(logits: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Shannon entropy (nats) of softmax over each row in `idx`, in float32: log Z - Σ e·x / Z with
    x = logits - max (`trace.watermark.entropy`'s formula, as llama.cpp's path computes it)."""
    if len(idx) == logits.shape[0] and idx == list(range(len(idx))):
        x = logits.float() - logits.amax(-1, keepdim=True).float()
    else:
        x = logits.index_select(0, torch.tensor(idx, dtype=torch.long, device=logits.device)).float()
        x -= x.amax(-1, keepdim=True)
    x.clamp_(min=-1e30)  # a banned token (-inf) weighs e^x = 0, not NaN
    e = torch.exp(x)
    z = e.sum(-1)
    return (torch.log(z) - (e.mul_(x)).sum(-1) / z).clamp_(min=0.0)
