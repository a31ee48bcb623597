"""Tiny llama-architecture GGUFs whose vocabularies carry a real family's special tokens and no FIM
tokens: Gemma-style (`<bos>`, `<eos>`, `<start_of_turn>`, `<end_of_turn>`) and Llama-3-style
(`<|begin_of_text|>`, `<|start_header_id|>`, ...), both with `add_bos_token` set and no chat
template, as a base Gemma 3 GGUF comes. A `<|fim_middle|>` control token can be added to see
that generated control tokens never become text. Random weights: tests force tokens with logits
processors where they need a particular one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GEMMA = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
FAMILIES = {"gemma": (GEMMA, "<bos>", "<eos>"), "llama3": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>")}
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Greeter:\n    def greet(self, name):\n        return f'hello {name}'\n",
    "user model system assistant\n\nThe quick brown fox jumps over the lazy dog.\n",
    "key = 'value'  # end of line\nprint(key)\n",
] * 20


def build_special_gguf(
    path: Path, family: str = "gemma", *, extra_specials: tuple[str, ...] = (), n_ctx: int = 512, n_embd: int = 64, seed: int = 0
) -> Path:
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials, bos, eos = FAMILIES[family]
    specials = [*specials, *extra_specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"{family}-style-test")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(2)
    w.add_feed_forward_length(n_embd * 2)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_rope_dimension_count(n_embd // 4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[bos])
    w.add_eos_token_id(vocab[eos])
    w.add_add_bos_token(True)

    def t(name: str, *shape: int, scale: float = 0.02) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    t("token_embd.weight", len(tokens), n_embd, scale=1.0)
    t("output.weight", len(tokens), n_embd, scale=0.5)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(f"blk.{i}.{n}.weight", n_embd, n_embd)
        t(f"blk.{i}.ffn_gate.weight", n_embd * 2, n_embd)
        t(f"blk.{i}.ffn_up.weight", n_embd * 2, n_embd)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_embd * 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
