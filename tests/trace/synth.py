"""Small llama-architecture GGUFs with random weights of realistic statistics, for tests and bench.

Weights: per-row scales drawn log-normally around std 0.02 (GPT-2 init), Student-t (ν = 6)
entries for the heavy tails trained weights have, residual projections scaled by
1/√(2·n_layer) (GPT-2, Radford et al. 2019). The tokenizer is a real byte-level BPE trained on a
little Python so that llama.cpp tokenizes and detokenizes ordinary code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def corpus(n_files: int = 40) -> list[str]:
    """Python source from the standard library (sorted, so the result is reproducible)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:n_files]
    return [p.read_text(errors="replace") for p in files]


def train_bpe(vocab_size: int, texts: list[str]) -> tuple[list[str], list[str]]:
    """Tokens (byte-level strings) and merges of a BPE trained on `texts`; id 0 is <|endoftext|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [t for t, _ in vocab], merges


@dataclass
class Shape:
    n_layer: int = 2
    n_embd: int = 64
    n_ff: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    vocab: int = 320
    n_ctx: int = 256
    out_std: float = 0.3  # larger: peakier next-token distributions
    in_std: float = 0.08  # q, k, v, gate, up
    emb_std: float = 0.5


def random_weights(s: Shape, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights in numpy order (n_out, n_in), GGUF tensor names."""
    rng = np.random.default_rng(seed)
    hd = s.n_embd // s.n_head

    def mat(rows: int, cols: int, std: float = 0.02) -> np.ndarray:
        row_std = std * np.exp(0.3 * rng.standard_normal((rows, 1)))
        t = rng.standard_t(6, size=(rows, cols)) / np.sqrt(6 / 4)
        return (row_std * t).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    res = s.in_std / 4 / np.sqrt(2 * s.n_layer)
    w = {"token_embd.weight": mat(s.vocab, s.n_embd, s.emb_std), "output_norm.weight": norm(s.n_embd)}
    for i in range(s.n_layer):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm(s.n_embd)
        w[p + "attn_q.weight"] = mat(s.n_embd, s.n_embd, s.in_std)
        w[p + "attn_k.weight"] = mat(s.n_head_kv * hd, s.n_embd, s.in_std)
        w[p + "attn_v.weight"] = mat(s.n_head_kv * hd, s.n_embd, s.in_std)
        w[p + "attn_output.weight"] = mat(s.n_embd, s.n_embd, res * 4)
        w[p + "ffn_norm.weight"] = norm(s.n_embd)
        w[p + "ffn_gate.weight"] = mat(s.n_ff, s.n_embd, s.in_std)
        w[p + "ffn_up.weight"] = mat(s.n_ff, s.n_embd, s.in_std)
        w[p + "ffn_down.weight"] = mat(s.n_embd, s.n_ff, res * 4)
    w["output.weight"] = mat(s.vocab, s.n_embd, s.out_std)
    return w


def write_gguf(
    path: str | Path,
    s: Shape,
    weights: dict[str, np.ndarray],
    tokens: list[str],
    merges: list[str],
    dtype: str = "F32",
) -> Path:
    """A llama GGUF llama.cpp loads; matrices stored as `dtype` (F32, F16, Q8_0 or Q4_1)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(s.n_ctx)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_rope_dimension_count(s.n_embd // s.n_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt-2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1))
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    for name, a in weights.items():
        if a.ndim >= 2 and dtype == "F16":
            w.add_tensor(name, a.astype(np.float16))
        elif a.ndim >= 2 and dtype in ("Q8_0", "Q4_1"):
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType[dtype])
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType[dtype])
        else:
            w.add_tensor(name, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def tiny_model(
    path: str | Path,
    seed: int = 0,
    dtype: str = "F32",
    shape: Shape | None = None,
    tokenizer: tuple[list[str], list[str]] | None = None,
) -> Path:
    """Build and write a tiny random llama GGUF; returns its path."""
    s = shape or Shape()
    tokens, merges = tokenizer or train_bpe(s.vocab, corpus(20))
    s.vocab = len(tokens)
    return write_gguf(path, s, random_weights(s, seed), tokens, merges, dtype)
