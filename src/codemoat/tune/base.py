"""The base model to tune: the served GGUF, loaded into torch through transformers' GGUF reader.

transformers dequantises the GGUF's tensors and undoes llama.cpp's q/k row order, and rebuilds the
tokenizer from the GGUF's vocabulary and merges, so the adapter is trained against the very
weights llama.cpp serves. The base's identity is the SHA-256 of the GGUF file; an adapter records it
and is refused by a server whose model differs.

A sealed base (`.moat` + license) is opened as `serve` opens it (`engines.sealed.open_sealed`: the
license checked on this machine, a lease taken for a lease license, the process made non-dumpable)
and decrypted into a sealed memfd; transformers reads the GGUF from `/proc/self/fd/N`, and the
memfd is zeroed and closed as soon as the weights are in torch. No plaintext file is written. Its
identity is the manifest's `plaintext_sha256`, the SHA-256 of that same GGUF.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
    sealed: bool = False
    eos: str | None = None  # the tokenizer's end-of-text token, as text


def load_base(path: Path, *, n_ctx: int = 512, device: str = "cpu", license: Path | None = None) -> BaseModel:
    """The GGUF at `path` (or the sealed `.moat`, with its `license`) as a torch model (fp32) with its tokenizer."""
    path = Path(path).expanduser()
    if path.suffix == ".moat":
        if license is None:
            raise CodemoatError(f"{path.name} is sealed: pass --license FILE.lic (or set model.license)")
        with sealed_plaintext(path, Path(license).expanduser()) as (gguf, sha256, name):
            base = _load(gguf, n_ctx, device, sha256, name, path.name)
        base.sealed = True
        return base
    if path.suffix != ".gguf" or not path.is_file():
        raise CodemoatError(f"base model must be a .gguf file or a sealed .moat: {path}")
    return _load(path, n_ctx, device, file_sha256(path), path.stem, path.name)


@contextmanager
def sealed_plaintext(path: Path, license: Path) -> Iterator[tuple[Path, str, str]]:
    """(the plaintext GGUF as /proc/self/fd/N, its SHA-256, the model id) while inside; zeroed after."""
    from ..engines.sealed import open_sealed
    from ..vault.container import SealedFile

    if SealedFile(path).manifest.format != "gguf":
        raise CodemoatError(f"{path.name} does not hold a GGUF: tuning needs a GGUF base")

    class _Held:  # what the holder "serves": the decrypted buffer itself, zeroed at close
        in_flight = 0  # never streams (the holder tracks streams of real engines only)

        def __init__(self, buf) -> None:
            self.buf = buf

        def close(self) -> None:
            self.buf.close(zero=True)

    holder = open_sealed(path, license, watch=False, build=lambda _s, buf, _id, _parts: _Held(buf))
    try:
        held = holder.get()
        yield Path(held.buf.path), SealedFile(path).manifest.plaintext_sha256, holder.model_id
    finally:
        holder.close()


def _load(path: Path, n_ctx: int, device: str, sha256: str, name: str, shown: str) -> BaseModel:
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
        raise CodemoatError(f"cannot load {shown} for tuning: {str(e).splitlines()[0]}") from None
    model.to(device)
    cfg = model.config.to_dict()
    limit = int(cfg.get("max_position_embeddings") or n_ctx)
    arch = gguf_arch(path)
    return BaseModel(model, tok.backend_tokenizer, cfg, sha256, name, min(n_ctx, limit), arch, eos=tok.eos_token)


def gguf_arch(path: Path) -> str:
    """`general.architecture` of a GGUF file (read from its header only)."""
    import gguf

    f = gguf.GGUFReader(str(path)).fields.get("general.architecture")
    if f is None:
        raise CodemoatError(f"{path.name} names no architecture (general.architecture)")
    return bytes(f.parts[f.data[0]]).decode()
