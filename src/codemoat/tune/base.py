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

A Hugging Face folder (what the vllm engine serves), plaintext or sealed (`vendor seal` of a
folder), is a base too: transformers loads the folder, or, sealed, its config and tokenizer from a
private 0700 tmpfs folder and its weights from the decrypted memfd (`safetensors.torch.load` of
the bytes; no weight byte on a filesystem). Its identity is `engines.adapters.folder_sha256`, the
identity of its files as sealed (for a sealed folder, from its signed manifest: `parts_identity`). vLLM
checks an adapter against the folder it loads, so the adapter records it as `hf_sha256`: the
folder's digest, or for a GGUF the digest of its `.hf` folder beside it when there is one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engines.adapters import file_sha256, folder_sha256, parts_identity
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
    hf_sha256: str | None = None  # the Hugging Face folder vLLM would serve for this base (engines.adapters)


def load_base(path: Path, *, n_ctx: int = 512, device: str = "cpu", license: Path | None = None) -> BaseModel:
    """The GGUF at `path` (or the sealed `.moat`, with its `license`) as a torch model (fp32) with its tokenizer."""
    path = Path(path).expanduser()
    if path.suffix == ".moat":
        if license is None:
            raise CodemoatError(f"{path.name} is sealed: pass --license FILE.lic (or set model.license)")
        with sealed_plaintext(path, Path(license).expanduser()) as (plain, sha256, name):
            base = _load(plain, n_ctx, device, sha256, name, path.name)
            if plain.is_dir():  # a sealed Hugging Face folder: vLLM serves it as it is
                base.hf_sha256 = sha256
        base.sealed = True
        return base
    if path.is_dir():
        digest = folder_sha256(path)
        base = _load(path, n_ctx, device, digest, path.name.split(".")[0], path.name)
        base.hf_sha256 = digest
        return base
    if path.suffix != ".gguf" or not path.is_file():
        raise CodemoatError(f"base model must be a .gguf file, a Hugging Face model folder or a sealed .moat: {path}")
    base = _load(path, n_ctx, device, file_sha256(path), path.stem, path.name)
    twin = path.with_suffix(".hf")  # what vLLM serves for --model X.gguf (engines.vllm_engine.from_path)
    if twin.is_dir():
        base.hf_sha256 = folder_sha256(twin)
    return base


@contextmanager
def sealed_plaintext(path: Path, license: Path) -> Iterator[tuple[Path, str, str]]:
    """(the plaintext GGUF as /proc/self/fd/N, or a sealed folder's private config folder, its SHA-256,
    the model id) while inside; zeroed and removed after. A folder's weights are read by `_load` from
    the memfd (`_SEALED_WEIGHTS`), never from the folder."""
    from ..engines.sealed import open_sealed
    from ..engines.vllm_handoff import unpack_config
    from ..vault.container import SealedFile

    fmt = SealedFile(path).manifest.format
    if fmt not in ("gguf", "safetensors"):
        raise CodemoatError(f"{path.name} holds {fmt}: tuning needs a GGUF or a Hugging Face folder")

    class _Held:  # what the holder "serves": the decrypted buffer itself, zeroed at close
        in_flight = 0  # never streams (the holder tracks streams of real engines only)

        def __init__(self, buf, parts) -> None:
            self.buf, self.parts = buf, parts or {}

        def close(self) -> None:
            self.buf.close(zero=True)

    holder = open_sealed(path, license, watch=False, build=lambda _s, buf, _id, parts: _Held(buf, parts))
    private = None
    try:
        held = holder.get()
        where = Path(held.buf.path)
        digest = SealedFile(path).manifest.plaintext_sha256
        if fmt == "safetensors":
            private = unpack_config(held.buf.view, held.parts, "codemoat-tune-")
            for name, (off, size) in held.parts.items():
                if name.endswith(".safetensors"):
                    _SEALED_WEIGHTS[str(private.path)] = (held.buf.view, off, size)
            where = private.path
            digest = parts_identity(held.parts, digest)[0]  # as folder_sha256 of the folder sealed
        yield where, digest, holder.model_id
    finally:
        if private is not None:
            _SEALED_WEIGHTS.pop(str(private.path), None)
            private.remove()
        holder.close()


#: a sealed folder's private config folder -> (the decrypted memfd's view, offset, size of its safetensors)
_SEALED_WEIGHTS: dict[str, tuple[Any, int, int]] = {}


def _from_folder(folder: Path) -> Any:
    """transformers' model for a Hugging Face folder: from its files, or, for a sealed folder, its
    config from the private folder and its weights from the memfd (in memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    held = _SEALED_WEIGHTS.get(str(folder))
    if held is None:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    from safetensors.torch import load

    view, off, size = held
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)), dtype=torch.float32)
    state = {k: v.to(torch.float32) for k, v in load(bytes(view[off : off + size])).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"the sealed weights do not fit the model's config: {sorted(set(missing) - tied or unexpected)[:3]}")
    model.tie_weights()
    return model


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
        if path.is_dir():
            model, tok = _from_folder(path), AutoTokenizer.from_pretrained(str(path))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, OSError, KeyError) as e:
        raise CodemoatError(f"cannot load {shown} for tuning: {str(e).splitlines()[0]}") from None
    model.to(device)
    cfg = model.config.to_dict()
    limit = int(cfg.get("max_position_embeddings") or n_ctx)
    # llama.cpp names a folder's architecture as transformers does (llama, qwen2, gemma3...)
    arch = str(cfg.get("model_type") or "llama") if path.is_dir() else gguf_arch(path)
    return BaseModel(model, tok.backend_tokenizer, cfg, sha256, name, min(n_ctx, limit), arch, eos=tok.eos_token)


def gguf_arch(path: Path) -> str:
    """`general.architecture` of a GGUF file (read from its header only)."""
    import gguf

    f = gguf.GGUFReader(str(path)).fields.get("general.architecture")
    if f is None:
        raise CodemoatError(f"{path.name} names no architecture (general.architecture)")
    return bytes(f.parts[f.data[0]]).decode()
