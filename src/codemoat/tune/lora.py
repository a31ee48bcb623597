"""LoRA on the base (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") with
`peft`, and the adapter written for both engines:

- GGUF for llama.cpp: `general.architecture` the base's own (llama.cpp refuses an adapter whose
  architecture differs: "model arch and LoRA arch mismatch"), `general.type = adapter`,
  `adapter.type = lora`, `adapter.lora.alpha`, tensors `blk.N.<name>.weight.lora_a` (r × in) and
  `.lora_b` (out × r). Only a `llama` base has its q/k rows permuted into llama.cpp's interleaved
  RoPE order (by llama.cpp's converter; transformers' GGUF reader undoes it for that architecture
  alone), so only there are `lora_b`'s q/k rows permuted the same way; Gemma, Qwen and the rest keep
  HF's order. Either way base + B·A equals the tuned weight.
- safetensors in peft's layout (`adapter_model.safetensors` + `adapter_config.json`), which
  transformers and vLLM load.

The GGUF is written into an anonymous memfd and read back: the plaintext adapter never sits on disk.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..train.export import _HF_TO_GGUF, permute_qk

#: every linear layer of a llama block (attention and MLP)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def wrap(model, rank: int, alpha: float | None = None, dropout: float = 0.0):
    """`model` with trainable LoRA weights on every linear layer; the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def lora_pairs(peft_model) -> dict[str, tuple[Any, Any]]:
    """{HF weight name (model.layers.N.self_attn.q_proj.weight): (A, B)} as fp32 numpy arrays."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(peft_model)
    pairs: dict[str, list] = {}
    for k, v in sd.items():
        # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
        stem, which = k.rsplit(".lora_", 1)
        name = stem.removeprefix("base_model.model.") + ".weight"
        pairs.setdefault(name, [None, None])["AB".index(which[0])] = v.detach().float().cpu().numpy()
    return {k: (a, b) for k, (a, b) in pairs.items()}


#: GGUF architectures whose q/k rows llama.cpp's converter permutes (and transformers un-permutes)
PERMUTED_QK = {"llama"}


def gguf_bytes(peft_model, hf_config: dict, alpha: float, name: str, *, arch: str) -> bytes:
    """The adapter as a llama.cpp GGUF LoRA file for a base of GGUF architecture `arch`, in memory."""
    import gguf
    import numpy as np

    n_head, n_kv = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    permute = arch in PERMUTED_QK
    fd = os.memfd_create("codemoat-adapter", os.MFD_CLOEXEC)
    try:
        w = gguf.GGUFWriter(f"/proc/self/fd/{fd}", arch)
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(alpha))
        w.add_name(name)
        for hf_name, (a, b) in sorted(lora_pairs(peft_model).items()):
            _, _, i, rest = hf_name.split(".", 3)
            if permute and rest == "self_attn.q_proj.weight":
                b = permute_qk(b, n_head)
            elif permute and rest == "self_attn.k_proj.weight":
                b = permute_qk(b, n_kv)
            base = f"blk.{i}.{_HF_TO_GGUF[rest]}"
            w.add_tensor(base + ".lora_a", np.ascontiguousarray(a, dtype=np.float32))
            w.add_tensor(base + ".lora_b", np.ascontiguousarray(b, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def safetensors_bytes(peft_model) -> tuple[bytes, str]:
    """(adapter_model.safetensors bytes, adapter_config.json text) in peft's layout."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    sd = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    cfg = peft_model.peft_config["default"].to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    return save(sd), json.dumps(cfg, sort_keys=True, default=str)
