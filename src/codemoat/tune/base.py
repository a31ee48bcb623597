"""The base model to tune: the served GGUF, loaded into torch through transformers' GGUF reader.

transformers dequantises the GGUF's tensors and undoes llama.cpp's q/k row order, and rebuilds the
tokenizer from the GGUF's vocabulary and merges, so the adapter is trained against the very
weights llama.cpp serves. The base's identity is the SHA-256 of the GGUF file; an adapter records it
and is refused by a server whose model differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engines.adapters import file_sha256
from ..errors import CodemoatError


@dataclass
class BaseModel:
    model: Any  # transformers LlamaForCausalLM (fp32)
    tokenizer: Any  # tokenizers.Tokenizer
    hf_config: dict
    sha256: str
    name: str
    n_ctx: int
    arch: str = "llama"  # the GGUF's general.architecture, which the adapter's must equal


def load_base(path: Path, *, n_ctx: int = 512, device: str = "cpu") -> BaseModel:
    """The GGUF at `path` as a torch model (fp32) with its tokenizer; a sealed .moat is refused for now."""
    path = Path(path).expanduser()
    if path.suffix == ".moat":
        raise CodemoatError("tuning against a sealed base model is not supported yet: tune with the plaintext GGUF")
    if path.suffix != ".gguf" or not path.is_file():
        raise CodemoatError(f"base model must be a .gguf file: {path}")
    import os
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion bar would break the progress line
    warnings.filterwarnings("ignore", module=r"(transformers|peft)\.")  # deprecation notes meant for their developers
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, OSError, KeyError) as e:
        raise CodemoatError(f"cannot load {path.name} for tuning: {str(e).splitlines()[0]}") from None
    model.to(device)
    cfg = model.config.to_dict()
    limit = int(cfg.get("max_position_embeddings") or n_ctx)
    return BaseModel(model, tok.backend_tokenizer, cfg, file_sha256(path), path.stem, min(n_ctx, limit), gguf_arch(path))


def gguf_arch(path: Path) -> str:
    """`general.architecture` of a GGUF file (read from its header only)."""
    import gguf

    f = gguf.GGUFReader(str(path)).fields.get("general.architecture")
    if f is None:
        raise CodemoatError(f"{path.name} names no architecture (general.architecture)")
    return bytes(f.parts[f.data[0]]).decode()
