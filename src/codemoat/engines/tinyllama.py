"""A random-weight llama GGUF with a byte-level BPE vocabulary, written with the `gguf` package.

Used by the CPU self-test (`cpu.py`) and the engine benches: any shape, loads in milliseconds,
quantisable by `llama_cpp.llama_model_quantize` (K-quants need rows divisible by 256).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

EOS = "<|endoftext|>"


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode map: 256 printable characters standing for the 256 bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_random_llama(
    path: Path, *, n_embd: int = 512, n_ff: int = 1536, n_layer: int = 2, n_head: int = 4, n_ctx: int = 512, seed: int = 0
) -> Path:
    """Write an F32 llama GGUF with `n_embd` hidden units and a 512-token byte-level vocabulary."""
    import gguf

    letters = "etaoinsrhldcumfp"
    alphabet = byte_alphabet()
    merges = [f"{a} {b}" for a in letters for b in letters][:255]
    tokens = alphabet + [m.replace(" ", "") for m in merges] + [EOS]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("random-llama")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t == EOS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(False)

    def t(name: str, *shape: int, scale: float) -> None:
        w.add_tensor(name, (rng.standard_normal(shape, dtype=np.float32) * scale))

    n_vocab = len(tokens)
    t("token_embd.weight", n_vocab, n_embd, scale=1.0)
    t("output.weight", n_vocab, n_embd, scale=0.5)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(f"blk.{i}.{n}.weight", n_embd, n_embd, scale=n_embd**-0.5)
        t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd, scale=n_embd**-0.5)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd, scale=n_embd**-0.5)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff, scale=n_ff**-0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
