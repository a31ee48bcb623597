"""A tiny llama-architecture GGUF with a real byte-level BPE tokenizer and random weights.

Used by tests that need a model that loads in milliseconds; the bundled
models/codemoat-tiny.gguf is used where the text must make sense.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIALS = [
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<|im_start|>",
    "<|im_end|>",
]
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Greeter:\n    def greet(self, name):\n        return f'hello {name}'\n",
    "import os\nprint(os.getcwd())\n",
    "for i in range(10):\n    print(i * i)\n",
    "The quick brown fox jumps over the lazy dog. café ünïcode ✓\n",
] * 20


def build_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    n_layer: int = 2,
    n_embd: int = 64,
    n_ctx: int = 512,
    seed: int = 0,
    chat_template: str | None = None,
    n_ff: int | None = None,
    n_head: int = 4,
    n_kv: int | None = None,
    dtype: str = "F32",
    specials: list[str] = SPECIALS,
    corpus: list[str] = CORPUS,
    bos: str = "<|endoftext|>",
    eos: str = "<|endoftext|>",
    add_bos: bool = False,
    name: str | None = None,
) -> Path:
    """A GGUF of architecture `arch` ("llama", or "gemma3": see tests/tune/tinygemma.py) with random
    weights and a byte-level BPE vocabulary trained on `corpus`, `specials` marked as control tokens.
    `n_ff` defaults to 2 x `n_embd`, `n_kv` (KV heads) to `n_head`; `dtype` F16 halves the file of a
    wide llama (norms stay F32)."""
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    import json

    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    layout = LAYOUTS[arch]
    rng = np.random.default_rng(seed)
    n_ff = n_ff or n_embd * 2
    n_kv = n_kv or n_head
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name or ("tiny-test" if arch == "llama" else f"tiny-{arch}-test"))
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[bos])
    w.add_eos_token_id(vocab[eos])
    w.add_add_bos_token(add_bos)
    if chat_template:
        w.add_chat_template(chat_template)

    def t(name: str, *shape: int, scale: float) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32 if dtype == "F32" else np.float16))

    def norm(name: str, n: int, spread: float = 0.0) -> None:  # 1 + spread * noise (all ones without)
        w.add_tensor(name, (1.0 + rng.standard_normal(n) * spread).astype(np.float32) if spread else np.ones(n, np.float32))

    layout(w, t, norm, n_vocab=len(tokens), n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_kv=n_kv)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama(w, t, norm, *, n_vocab: int, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_kv: int) -> None:
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    t("token_embd.weight", n_vocab, n_embd, scale=1.0)
    t("output.weight", n_vocab, n_embd, scale=0.5)
    norm("output_norm.weight", n_embd)
    for i in range(n_layer):
        norm(f"blk.{i}.attn_norm.weight", n_embd)
        norm(f"blk.{i}.ffn_norm.weight", n_embd)
        head = n_embd // n_head
        for n, rows in (("attn_q", n_embd), ("attn_k", n_kv * head), ("attn_v", n_kv * head), ("attn_output", n_embd)):
            t(f"blk.{i}.{n}.weight", rows, n_embd, scale=0.02)
        t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd, scale=0.02)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd, scale=0.02)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff, scale=0.02)


def _gemma3(w, t, norm, *, n_vocab: int, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_kv: int) -> None:
    head_dim = 256  # as in every Gemma 3 (tests/tune/tinygemma.py says why)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(512)
    t("token_embd.weight", n_vocab, n_embd, scale=0.5)  # also the output matrix (tied)
    norm("output_norm.weight", n_embd, 0.1)  # stored as 1 + w (Gemma's RMSNorm multiplies by 1 + w)
    for i in range(n_layer):
        for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            norm(f"blk.{i}.{n}.weight", n_embd, 0.1)
        norm(f"blk.{i}.attn_q_norm.weight", head_dim, 0.1)
        norm(f"blk.{i}.attn_k_norm.weight", head_dim, 0.1)
        t(f"blk.{i}.attn_q.weight", n_head * head_dim, n_embd, scale=0.05)
        t(f"blk.{i}.attn_k.weight", n_kv * head_dim, n_embd, scale=0.05)
        t(f"blk.{i}.attn_v.weight", n_kv * head_dim, n_embd, scale=0.05)
        t(f"blk.{i}.attn_output.weight", n_embd, n_head * head_dim, scale=0.05)
        t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd, scale=0.05)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd, scale=0.05)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff, scale=0.05)


#: architecture -> its hyperparameters and tensors, as llama.cpp's converter lays them out
LAYOUTS = {"llama": _llama, "gemma3": _gemma3}


#: llama.cpp file types (LLAMA_FTYPE_MOSTLY_*) the tests quantise to
QUANTS = {"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def quantise(src: Path, dst: Path, quant: str) -> Path:
    """llama.cpp's own quantiser, as customers receive GGUFs (K-quants need rows divisible by 256;
    llama.cpp stores other rows in a fallback type: see `tensor_types`)."""
    import ctypes

    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = QUANTS[quant]
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) != 0:
        raise RuntimeError(f"llama_model_quantize to {quant} failed")
    return dst


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF holds, e.g. {"Q4_K": 14, "Q6_K": 1, "F32": 11}."""
    import collections

    import gguf

    return dict(collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors))
