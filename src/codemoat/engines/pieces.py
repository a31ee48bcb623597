"""What a token the batched engine generated adds to its answer (`engines.batch`), as the one-at-a-time
engine (`LlamaCppEngine._generate`) takes it: an end-of-generation token ends the answer; a control token
is never text (`<|fim_middle|>` must not appear in an answer) and ends it when a stop string names it;
any other token's bytes grow the answer's text by its complete UTF-8 sequences (the answer is not decoded
again from its start). A token's facts are looked up in the vocabulary once per token id."""

from __future__ import annotations

import ctypes
from typing import Any

from .base import FinishReason
from .slots import Seq


def valid_utf8_prefix(b: bytes) -> int:
    """Length of the longest prefix of `b` that does not end inside a UTF-8 sequence."""
    n = len(b)
    for back in range(1, min(4, n) + 1):
        c = b[n - back]
        if c & 0xC0 == 0x80:  # continuation byte: keep looking for the lead
            continue
        if c & 0x80 == 0:
            return n
        need = 2 if c & 0xE0 == 0xC0 else 3 if c & 0xF0 == 0xE0 else 4
        return n if back >= need else n - back
    return n


class Pieces:
    """The vocabulary's tokens as an answer takes them; runs on the batcher's thread."""

    def __init__(self, lib: Any, vocab: Any):
        self.lib, self.vocab = lib, vocab
        self._piece = ctypes.create_string_buffer(256)
        self._tokens: dict[int, tuple[bool, bool, Any]] = {}  # token id -> (end of generation, control, its text)

    def _text(self, tok: int, special: bool) -> bytes:
        n = self.lib.llama_token_to_piece(self.vocab, tok, self._piece, len(self._piece), 0, special)
        if n < 0:  # a piece longer than the buffer: -n is its length
            self._piece = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, tok, self._piece, len(self._piece), 0, special)
        return self._piece.raw[: max(n, 0)]

    def _token(self, tok: int) -> tuple[bool, bool, Any]:
        """(ends generation, is a control token, its text: a control token's as str, with specials; else bytes)."""
        facts = self._tokens.get(tok)
        if facts is None:
            lib = self.lib
            control = bool(lib.llama_vocab_is_control(self.vocab, tok))
            text = self._text(tok, True).decode("utf-8", "replace") if control else self._text(tok, False)
            facts = self._tokens[tok] = (bool(lib.llama_vocab_is_eog(self.vocab, tok)), control, text)
        return facts

    def take(self, s: Seq, tok: int) -> FinishReason | None:
        """The generated token `tok` added to `s`'s answer; a finish reason when it ends the answer."""
        p, cutter = s.params, s.cutter
        assert cutter is not None
        eog, control, text = self._token(tok)
        if eog:
            return "stop"
        s.n_gen += 1
        if control:
            # a control token is never text; one that a stop string names ends the answer
            if text in p.stop:
                return "stop"
        elif text:
            raw = s.tail + text
            n = valid_utf8_prefix(raw)
            if n:
                s.text += raw[:n].decode("utf-8", "replace")
            s.tail = raw[n:]
        if cutter.feed(s.text, tok):
            return "stop"
        if s.n_gen >= p.max_tokens:
            return "length"
        return None
