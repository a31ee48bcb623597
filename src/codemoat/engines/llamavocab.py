"""The tokenizer side of a llama.cpp engine: tokenise, detokenise and special-token facts, run by the server's
threads on the native model while its worker generates. `close()` frees the model only once every such call has
left it (`_hold` / `_leave` / `_free_model`): a tokenisation reading a freed vocabulary crashed the process."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from .tokcache import MIN_CHARS, SCOPE, TokenCache
from .tokgrow import MIN_BYTES, TokenGrowth

_UNREAD = object()  # `_bos` not read yet


class NativeVocab:
    """Mixed into `LlamaCppEngine`, which sets `_llm`, `_model`, `_lib`, `_vocab`, `_special_cache`, `_closed`,
    `_users` and `_users_cv` (a `threading.Condition`), and gives `closed_error()`."""

    def _hold(self) -> None:
        """A server thread enters the native model (tokenise, detokenise): `close()` frees the model only once
        every such call has left it (`_leave`), and none enters once it is closed (a 503 that says why)."""
        with self._users_cv:
            if self._closed:
                raise self.closed_error()
            self._users += 1

    def _leave(self) -> None:
        with self._users_cv:
            self._users -= 1
            if not self._users:
                self._users_cv.notify_all()

    def _free_model(self) -> None:
        """Free the native model after the calls in it end (a tokenisation reading a freed vocabulary crashed
        the process: the inline engine's close under a request)."""
        with self._users_cv:
            self._users_cv.wait_for(lambda: not self._users)
        self._llm.close()

    def has_token(self, text: str) -> bool:
        """Whether `text` is one special token of this vocabulary."""
        hit = self._special_cache.get(text)
        if hit is None:
            self._hold()
            try:
                ids = self._model.tokenize(text.encode(), add_bos=False, special=True)
                hit = len(ids) == 1 and self._lib.llama_vocab_is_control(self._vocab, ids[0])
                hit = bool(hit) or (len(ids) == 1 and ids != self._model.tokenize(text.encode(), add_bos=False, special=False))
            finally:
                self._leave()
            self._special_cache[text] = hit
        return hit

    def token_text(self, which: str) -> str:
        """Text of the bos/eos token ("" if the model has none)."""
        self._hold()
        try:
            tid = self._model.token_bos() if which == "bos" else self._model.token_eos()
            if tid is None or tid < 0:
                return ""
            return self.piece(tid, True).decode("utf-8", "replace")  # whole: `detokenize` read 32 bytes at most
        finally:
            self._leave()

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids with the model's BOS once (a text that starts with the BOS token keeps just that one)."""
        from .templates import Part

        return self.encode([Part(text, special)])

    def _add_bos(self) -> bool:
        return str(self._model.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"

    def _tokenize(self, text: str, special: bool) -> list[int]:
        """llama.cpp's tokenizer into a buffer that fits: llama-cpp-python sizes its buffer by the training
        context, which a vocab-only model (the server's `front`) reports as 0, so it tokenised every text twice.
        A text the same caller sent a moment ago is not tokenised again (`tokcache`); one that grew from such a text
        is tokenised from a line start before the change (`tokgrow`)."""
        if self._closed:  # its vocabulary is freed: a 503 that says why, not a crash
            raise self.closed_error()
        scope = SCOPE.get() if len(text) >= MIN_CHARS else None
        if scope is None:
            return self._native(text.encode(), special)
        cache = self.token_cache()
        hit = cache.get(scope, special, text)
        if hit is not None:
            return hit
        b = text.encode()
        if len(b) >= MIN_BYTES:  # a text that grew from one this caller sent: only its new end (`tokgrow`)
            ids = self.token_growth().tokenise(scope, special, b, self._native, self._lengths)
        else:
            ids = self._native(b, special)
        cache.put(scope, special, text, ids)
        return ids

    def _native(self, b: bytes, special: bool) -> list[int]:
        """llama.cpp's tokenizer on `b` (no BOS), into a buffer that fits."""
        buf = (ctypes.c_int32 * (len(b) + 8))()  # a token covers a byte or more; room for a leading-space token
        n = self._lib.llama_tokenize(self._vocab, b, len(b), buf, len(buf), False, special)
        return buf[:n] if n >= 0 else self._model.tokenize(b, add_bos=False, special=special)

    def _lengths(self, ids: Sequence[int], special: bool) -> list[int] | None:
        """The byte length of each of `ids`' texts (`tokgrow`), from a table per token id filled as tokens are
        first seen; None for an id that is not this vocabulary's."""
        tables = self.__dict__.get("_piece_lengths")
        if tables is None:
            n_vocab = int(self._lib.llama_vocab_n_tokens(self._vocab))
            tables = self.__dict__.setdefault("_piece_lengths", ([-1] * n_vocab, [-1] * n_vocab))
        lens = tables[1 if special else 0]  # -1: not looked up yet
        try:
            got = [lens[t] for t in ids]
        except IndexError:
            return None
        if -1 in got:
            for i, t in enumerate(ids):
                if got[i] < 0:
                    if t < 0:
                        return None
                    got[i] = lens[t] = len(self.piece(t, special))
        return got

    def token_growth(self) -> TokenGrowth:
        """This vocabulary's `TokenGrowth` (made on first use, as `token_cache`)."""
        got = self.__dict__.get("_token_growth")
        return got if got is not None else self.__dict__.setdefault("_token_growth", TokenGrowth())

    def token_cache(self) -> TokenCache:
        """This vocabulary's `TokenCache` (made on first use; a new model is a new engine, with a new one)."""
        cache = self.__dict__.get("_token_cache")
        return cache if cache is not None else self.__dict__.setdefault("_token_cache", TokenCache())

    def encode(self, parts: Sequence[Any], bos: bool = True) -> list[int]:
        self._hold()
        try:
            ids = [t for p in parts if p.text for t in self._tokenize(p.text, p.special)]
            first = self._bos() if bos else None
        finally:
            self._leave()
        if first is not None and ids[:1] != [first]:
            ids.insert(0, first)
        return ids

    def _bos(self) -> int | None:
        """The BOS token a prompt starts with, None if the model adds none; read once (a model's vocabulary and
        metadata do not change; read on each prompt, they were ~20 us of a cold tokenisation's ~300 on a slow
        host). Called inside `_hold`."""
        got = self.__dict__.get("_bos_id", _UNREAD)
        if got is _UNREAD:
            first = self._model.token_bos()
            got = first if self._add_bos() and first is not None and first >= 0 else None
            self.__dict__["_bos_id"] = got
        return got

    def piece(self, tok: int, special: bool = False) -> bytes:
        """A token's text, whatever its length (llama-cpp-python's `detokenize` reads each into 32 bytes and
        drops a longer one: a run of 33 spaces, a `# ----` rule), looked up once per token. The pieces are kept in two
        lists indexed by token id (plain and special readings): a few MiB at most for a 262k-token vocabulary, where
        a dict keyed by (token, special) took 42 MiB once every token had been seen (reviewer V4)."""
        table = self.__dict__.get("_pieces")
        if table is None:
            n_vocab = int(self._lib.llama_vocab_n_tokens(self._vocab))
            table = self.__dict__.setdefault("_pieces", ([None] * n_vocab, [None] * n_vocab))
        row = table[1 if special else 0]
        if not 0 <= tok < len(row):  # not a token of this vocabulary: llama.cpp would read past its table
            return b""
        got = row[tok]
        if got is None:
            buf = ctypes.create_string_buffer(64)
            n = self._lib.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, special)
            if n < 0:  # longer than the buffer: -n is its length
                buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, special)
            got = row[tok] = buf.raw[: max(n, 0)]
        return got

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids` without control tokens (they are the template's, never the answer's)."""
        self._hold()
        try:
            ids = list(ids)
            out = b"".join([self.piece(t) for t in ids])
            bos = self._model.token_bos()
        finally:
            self._leave()
        if ids and ids[0] == bos and out[:1] == b" ":  # as llama-cpp-python did: a leading space after BOS goes
            out = out[1:]
        return out.decode("utf-8", "replace")
