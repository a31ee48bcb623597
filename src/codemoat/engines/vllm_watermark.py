"""The output watermark inside vLLM: one logits processor registered at start-up, keyed per request.

vLLM v1 takes no per-request logits processors. `WatermarkLogits` is registered when the engine
starts (`AsyncEngineArgs(logits_processors=[...])`, by qualified name so the spawned workers
import it) and applies codemoat's watermark (`trace.watermark`, Kirchenbauer et al. with SWEET's
entropy gate) to the requests whose `SamplingParams.extra_args[WATERMARK_ARG]` holds a key
(hex), leaving every other row of the batch untouched. Per step it is vectorised over the batch in
torch: one entropy over the keyed rows, one PRF call per key for all of its rows' green masks
(AES from `trace`, the same green lists as llama.cpp's `WatermarkProcessor`), one masked add.

This is the V1 sampler's interface (`vllm.v1.sample.logits_processor.LogitsProcessor`), which the
CPU build runs; vLLM's GPU Model Runner V2 has its own interface, not implemented here (pin the
V1 runner on GPUs: `VLLM_USE_V2_MODEL_RUNNER=0`).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

WATERMARK_ARG = "codemoat_watermark_key"
QUALNAME = "codemoat.engines.vllm_watermark:WatermarkLogits"


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
        vals = torch.frombuffer(bytearray(raw), dtype=torch.int16).to(torch.int32) & 0xFFFF
        return (vals.view(len(prevs), n * 8)[:, :width] < g.limit).to(self.device)

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
        rows = torch.tensor(idx, dtype=torch.long, device=logits.device)
        logp = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1)
        ent = -(torch.exp(logp) * torch.nan_to_num(logp, neginf=0.0)).sum(-1)
        hot = (ent >= self.tau).nonzero().flatten().tolist()  # SWEET's gate first: masks only where it opens
        if not hot:
            return logits
        width = logits.shape[1]
        mask = torch.empty((len(hot), width), dtype=torch.bool, device=logits.device)
        for key in dict.fromkeys(keys[j] for j in hot):
            at = [n for n, j in enumerate(hot) if keys[j] == key]
            mask[at] = self.masks(key, [prevs[hot[n]] for n in at], width)
        if self.vocab_size is not None and self.vocab_size < width:
            mask[:, self.vocab_size :] = False
        sel = torch.tensor([idx[j] for j in hot], dtype=torch.long, device=logits.device)
        logits.index_add_(0, sel, mask.to(logits.dtype) * self.delta)
        return logits
