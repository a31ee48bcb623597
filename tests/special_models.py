"""Tiny llama-architecture GGUFs whose vocabularies carry a real family's special tokens and no FIM
tokens: Gemma-style (`<bos>`, `<eos>`, `<start_of_turn>`, `<end_of_turn>`) and Llama-3-style
(`<|begin_of_text|>`, `<|start_header_id|>`, ...), both with `add_bos_token` set and no chat
template, as a base Gemma 3 GGUF comes. A `<|fim_middle|>` control token can be added to see
that generated control tokens never become text. Random weights: tests force tokens with logits
processors where they need a particular one.
"""

from __future__ import annotations

from pathlib import Path

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
    from tinymodel import build_tiny_gguf

    specials, bos, eos = FAMILIES[family]
    return build_tiny_gguf(
        path,
        n_ctx=n_ctx,
        n_embd=n_embd,
        seed=seed,
        specials=[*specials, *extra_specials],
        corpus=CORPUS,
        bos=bos,
        eos=eos,
        add_bos=True,
        name=f"{family}-style-test",
    )
