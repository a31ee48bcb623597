"""The scale-out engine: vLLM (continuous batching, tensor parallel; multi-node through Ray).

vLLM needs a CUDA GPU (FIELD-NOTES: vLLM 0.33 wants CUDA torch 2.14 and flashinfer), so this
engine is not exercised by the CPU test suite; its test skips with that reason.

Watermarking: vLLM's V1 engine no longer takes per-request logits processors. codemoat registers
one processor class at start-up (`WatermarkAdapter`, a vLLM `AdapterLogitsProcessor`) and keys it
per request through `SamplingParams.extra_args["codemoat_watermark_key"]`; requests without a
key are left alone.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import CodemoatError
from .base import Chunk, Engine, SamplingParams

WATERMARK_ARG = "codemoat_watermark_key"


def _adapter_class():
    """The start-up logits processor that applies codemoat's watermark to keyed requests."""
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class WatermarkAdapter(AdapterLogitsProcessor):
        def is_argmax_invariant(self) -> bool:
            return False  # it shifts green-list logits, which can change the argmax

        def new_req_logits_processor(self, params):
            key = (params.extra_args or {}).get(WATERMARK_ARG)
            if not key:
                return None
            import numpy as np
            import torch

            from ..trace.watermark import WatermarkProcessor

            proc = WatermarkProcessor(bytes.fromhex(key))

            def apply(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
                out = proc(output_ids, logits.float().cpu().numpy().astype(np.float32))
                return torch.from_numpy(out).to(logits.device, logits.dtype)

            return apply

    return WatermarkAdapter


class VllmEngine(Engine):
    name = "vllm"

    def __init__(self, model: str, *, model_id: str | None = None, n_ctx: int = 4096, tensor_parallel_size: int = 1, **_: Any):
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise CodemoatError(f"the vllm engine needs vLLM and a CUDA GPU: {e}") from None
        args = AsyncEngineArgs(
            model=model,
            max_model_len=n_ctx,
            tensor_parallel_size=tensor_parallel_size,
            logits_processors=[_adapter_class()],
        )
        self._engine = AsyncLLM.from_engine_args(args)
        self._tok = self._engine.tokenizer if hasattr(self._engine, "tokenizer") else None
        self._n_ctx = n_ctx
        self.model_id = model_id or Path(model).name

    @classmethod
    def from_path(cls, path: str | Path, **kw: Any) -> VllmEngine:
        return cls(str(path), **kw)

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def has_token(self, text: str) -> bool:
        vocab = self._tok.get_vocab() if self._tok else {}
        return text in vocab

    def token_text(self, which: str) -> str:
        if not self._tok:
            return ""
        return (self._tok.bos_token if which == "bos" else self._tok.eos_token) or ""

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    async def stream(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        from vllm import SamplingParams as VParams

        self.check_prompt(prompt, params.max_tokens)
        extra = {WATERMARK_ARG: params.watermark.hex()} if isinstance(params.watermark, bytes) else None
        vp = VParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            repetition_penalty=params.repeat_penalty,
            stop=params.stop or None,
            seed=params.seed,
            extra_args=extra,
        )
        rid = uuid.uuid4().hex
        sent_text, sent_ids = 0, 0
        try:
            # token ids built by the server go in as vLLM's TokensPrompt (not tokenised again)
            source = prompt if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
            async for out in self._engine.generate(source, vp, rid):
                o = out.outputs[0]
                text, ids = o.text[sent_text:], list(o.token_ids[sent_ids:])
                sent_text, sent_ids = len(o.text), len(o.token_ids)
                reason = {"stop": "stop", "length": "length"}.get(o.finish_reason or "", None) if out.finished else None
                if text or ids or reason:
                    yield Chunk(text, ids, reason or ("stop" if out.finished else None))
        except asyncio.CancelledError:
            await self._engine.abort(rid)
            raise
        finally:
            if sent_ids == 0:
                await self._engine.abort(rid)

    def close(self) -> None:
        shutdown = getattr(self._engine, "shutdown", None)
        if shutdown:
            shutdown()
