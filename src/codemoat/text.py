"""Text from outside (a model's answer, a committer's file names and text, a server's error) made safe to show: what a
terminal or a prompt would act on rather than show is written as an escape (`\\x1b`, `\\u202e`)."""

from __future__ import annotations

import functools
import re
import unicodedata

#: C0 and C1 controls (ESC, BEL, CR, newline...), DEL, UTF-16 surrogates (which a `surrogateescape` stdout writes as
#: raw bytes: `\udc9b` is an 8-bit CSI), the line and paragraph separators, the left-to-right and right-to-left marks,
#: the Arabic letter mark, and the bidirectional embeddings, overrides and isolates ("Trojan Source")
_ACTED_ON = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u200e\u200f\u061c\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match) -> str:
    n = ord(m[0])
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


@functools.cache
def _acted_on_but(keep: str) -> re.Pattern:
    return re.compile(f"(?![{re.escape(keep)}])" + _ACTED_ON.pattern) if keep else _ACTED_ON


def shown(text: str, keep: str = "") -> str:
    """`text` with every character a terminal would act on written as an escape; those in `keep` (code's newlines and
    tabs) stay as they are."""
    return _acted_on_but(keep).sub(_escape, text)


def acts_on_a_terminal(text: str) -> bool:
    """Whether `text` holds a character `shown` would escape."""
    return _ACTED_ON.search(text) is not None


def unsafe_name(name: str) -> bool:
    """Whether a name (a file's, a pack member's) holds a character that would show it as another name or act on a
    terminal: what `shown` escapes, or a format character (zero-width spaces and joiners, the byte-order mark),
    which text may carry but a name should not."""
    return acts_on_a_terminal(name) or any(unicodedata.category(c) == "Cf" for c in name)
