"""What a Hugging Face model folder tells without its weights: config.json and tokenizer.json.

The `transformers` and `vllm` engines both serve such folders and tokenise here, with the model's
tokenizer.json (the `tokenizers` library): one mixin gives both the facts the server reads (context,
vocabulary, metadata for template detection, special tokens) and the tokenizer.

    class MyHfEngine(HfModel, Engine):
        def __init__(self, config, tokenizer_json, n_ctx):
            self._config = config
            self._load_tokenizer(tokenizer_json)
            self._n_ctx = fit_context(config, n_ctx, default=2048)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: tokens that end a generation besides eos (llama.cpp treats Qwen's FIM pad/repo/file separators as end-of-generation too)
EOG_TEXTS = ("<|endoftext|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<|im_end|>", "<|eot_id|>", "<|EOT|>")


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of `folder`, with tokenizer_config.json's `chat_template` where config.json has none."""
    config = json.loads((folder / "config.json").read_text())
    tc = folder / "tokenizer_config.json"
    if "chat_template" not in config and tc.is_file():
        tmpl = json.loads(tc.read_text()).get("chat_template")
        if isinstance(tmpl, str):
            config["chat_template"] = tmpl
    return config


def fit_context(config: dict[str, Any], n_ctx: int | None, default: int) -> int:
    """The context to serve: `n_ctx` (when set), never more than the model's position embeddings
    (`default` where config.json does not say)."""
    limit = int(config.get("max_position_embeddings") or default)
    return min(n_ctx, limit) if n_ctx else limit


class HfModel:
    """Facts and tokenizer of a Hugging Face model; the engine sets `_config`, `_n_ctx` and
    `model_id` and calls `_load_tokenizer` in its constructor."""

    _config: dict[str, Any]
    _n_ctx: int
    model_id: str

    def _load_tokenizer(self, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(tokenizer_json)
        self._tok_plain = Tokenizer.from_str(tokenizer_json)
        self._tok_plain.encode_special_tokens = True  # special=False: "<|endoftext|>" in text is just text
        #: special token text → id
        self._specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}

    def _eog_ids(self, eos: bool = True) -> set[int]:
        """Ids that end a generation: the end-of-generation specials this model has (and its eos)."""
        ids = {self._specials[t] for t in EOG_TEXTS if t in self._specials}
        eos_id = self._config.get("eos_token_id")
        if eos and isinstance(eos_id, int):
            ids.add(eos_id)
        return ids

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_vocab(self) -> int:
        return int(self._config.get("vocab_size") or self._tok.get_vocab_size())

    @property
    def metadata(self) -> dict[str, Any]:
        md: dict[str, Any] = {"general.architecture": self._config.get("model_type", ""), "general.name": self.model_id}
        if isinstance(self._config.get("chat_template"), str):
            md["tokenizer.chat_template"] = self._config["chat_template"]
        md.update({f"config.{k}": v for k, v in self._config.items() if isinstance(v, (int, float, str))})
        return md

    @property
    def vocab(self) -> set[str]:
        return set(self._specials)

    def has_token(self, text: str) -> bool:
        return text in self._specials

    def token_text(self, which: str) -> str:
        tid = self._config.get("bos_token_id" if which == "bos" else "eos_token_id")
        return (self._tok.id_to_token(tid) or "") if isinstance(tid, int) else ""

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        tok = self._tok if special else self._tok_plain
        return tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids` without special tokens (they are the template's, never the answer's)."""
        return self._tok.decode(list(ids), skip_special_tokens=True)
