"""Byte-level BPE tokenizer trained with Hugging Face `tokenizers`, compatible with llama.cpp.

- Special tokens are Qwen2.5-Coder's (Hui et al. 2024, "Qwen2.5-Coder Technical Report", §3),
  so the same FIM and repository prompt templates serve the bundled model and real Qwen models.
- Pre-tokenisation uses Qwen2's split regex; llama.cpp knows it as pre-tokenizer "qwen2", so
  token ids agree exactly between the two (tests/engines/test_parity.py checks this).
- Byte-level alphabet (Radford et al. 2019, GPT-2 §2.2): every byte has a token, no unknowns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

ENDOFTEXT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_PAD = "<|fim_pad|>"
REPO_NAME = "<|repo_name|>"
FILE_SEP = "<|file_sep|>"
SPECIAL_TOKENS = [ENDOFTEXT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, REPO_NAME, FILE_SEP]

#: Qwen2's pre-tokenizer split (tokenizer.json of Qwen2.5-Coder); llama.cpp: LLAMA_VOCAB_PRE_TYPE_QWEN2
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE = "qwen2"


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A `tokenizers.Tokenizer` trained on `texts`; special tokens take ids 0..6."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def vocab_and_merges(tok) -> tuple[list[str], list[str]]:
    """Tokens ordered by id, and merges as "a b" strings (the GGUF `gpt2` tokenizer model)."""
    model = json.loads(tok.to_str())["model"]
    vocab = [""] * len(model["vocab"])
    for piece, i in model["vocab"].items():
        vocab[i] = piece
    for added in json.loads(tok.to_str())["added_tokens"]:
        if added["id"] >= len(vocab):
            vocab.extend([""] * (added["id"] + 1 - len(vocab)))
        vocab[added["id"]] = added["content"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return vocab, merges


def special_ids(tok) -> dict[str, int]:
    return {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
