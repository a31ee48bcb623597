"""Token ids of the long texts a caller sent a moment ago, so that the next request does not tokenise them again.

An editor sends the whole neighbourhood of the cursor on every keystroke: the prefix grows by what was
typed, but the suffix after the cursor, the other open files (Continue's and Tabby's extra context,
llama.vscode's ring of chunks) and the retrieved snippets are the same texts as a moment ago. Each is
tokenised on its own (`prompts.build_fim`), at ~0.2 µs a character: 10,000 characters of unchanged
context cost ~2 ms of the server process's CPU per keystroke, on the path to the first token.

A text is looked up by its exact characters (a tokenizer is a function of its text), only within the
caller's own scope (`SCOPE`, the user's name, set by `serve.service.Service.prepare`): whether another
user's request comes back faster must not tell anyone whether a text was just sent by someone else (the
prefix cache of the engine's slots is kept per user for the same reason). Without a scope nothing is
cached. Short texts are kept too: a request's whole prompt of a few lines, sent again as an editor re-asks
for the completion it cancelled, a chat's system prompt, a short suffix. Tokenising 150 characters cold,
as the engine's decode steps since the last request leave llama.cpp's tokeniser out of the caches, took
~0.23 ms of the ~4.6 ms to a one-client first token (bench/serve.py, 2026-12-07); a hit is a dict look-up.
Only texts under `MIN_CHARS` (a token or two) are tokenised each time. At most `MAX_CHARS` characters are
held in all, each text counted as `ENTRY_CHARS` more than its length (what an entry costs beside its
characters: its key, its ids' array, the dict's slot), the least recently used going first, whoever sent
them: a user who sends much can push others' texts out (a slowdown, and a hint of how much others send,
never what). The ids are kept as 4-byte integers and every hit is a new list (callers may change what they
get).
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from contextvars import ContextVar

#: whose texts this thread's tokenisations are (None: nobody's, not cached)
SCOPE: ContextVar[str | None] = ContextVar("codemoat_token_scope", default=None)
#: a text shorter than this is tokenised each time: a token or two, which a look-up would hardly beat
MIN_CHARS = 16
#: what an entry costs beside its text, counted in characters against `MAX_CHARS` (~200 bytes of key tuple,
#: array and dict slot): a flood of tiny texts is bounded by the same budget as a few long ones
ENTRY_CHARS = 64
#: characters held in all (~80 editors' neighbourhoods of 25,000); their ids add ~4 MiB for code, up to ~32 MiB
#: for text of up to 4 tokens a character (emoji, CJK)
MAX_CHARS = 2 << 20


class TokenCache:
    """(scope, special, text) -> token ids, bounded by the characters of the texts held (least recently used out)."""

    def __init__(self, max_chars: int = MAX_CHARS):
        self.max_chars = max_chars
        self.chars = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[tuple[str, bool, str], array] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, scope: str, special: bool, text: str) -> list[int] | None:
        key = (scope, special, text)
        with self._lock:
            ids = self._items.get(key)
            if ids is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
        return ids.tolist()

    def put(self, scope: str, special: bool, text: str, ids: list[int]) -> None:
        if len(text) + ENTRY_CHARS > self.max_chars:
            return
        key = (scope, special, text)
        kept = array("i", ids)
        with self._lock:
            if key in self._items:
                return
            self._items[key] = kept
            self.chars += len(text) + ENTRY_CHARS
            while self.chars > self.max_chars:
                (_, _, old), _ = self._items.popitem(last=False)
                self.chars -= len(old) + ENTRY_CHARS

    def __len__(self) -> int:
        return len(self._items)
