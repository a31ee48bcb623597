"""`tokgrow`'s bound is on memory, not on characters of text: a text of a token a byte (rare CJK, emoji) held 4 bytes
of ids and 8 of token ends beside each byte counted, so 8 MiB "of text" was 104 MiB (reviewer, session 25). Real
llama.cpp tokenisations of the bundled model; the memory is the arrays' own sizes."""

from __future__ import annotations

import random

import pytest

from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.engines.tokgrow import MIN_BYTES, TokenGrowth


@pytest.fixture(scope="module")
def front(tiny_gguf):
    e = LlamaCppEngine.front(str(tiny_gguf))
    yield e
    e.close()


def _memory(g: TokenGrowth) -> int:
    got = 0
    for recent in g._scopes.values():
        for x in recent:
            got += len(x.data) + x.ids.itemsize * len(x.ids) + (x.ends.itemsize * len(x.ends) if x.ends is not None else 0)
    return got


def _text(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.randrange(0x20000, 0x2A6D0)) for _ in range(n)) + "\n"  # 4 bytes, 4 tokens each


def _grow_through(front, g: TokenGrowth, texts: list[tuple[str, str]]) -> None:
    for user, text in texts:
        b = text.encode()
        assert g.tokenise(user, False, b, front._native, front._lengths) == front._native(b, False)


def test_texts_of_a_token_a_byte_are_held_within_the_bound(front):
    rng = random.Random(7)
    assert len(front._native(_text(rng, 200).encode(), False)) == 801  # a token a byte, as the test needs
    g = TokenGrowth(max_bytes=64 << 10)
    texts = []
    for user in range(6):
        base = "".join(_text(rng, 20) for _ in range(20))  # lines of 81 bytes, 1,620 in all: above MIN_BYTES
        for k in range(4):
            base += _text(rng, 20)  # a line longer: grown, and the ends of the text grown from are held
            texts.append((f"u{user}", base))
    _grow_through(front, g, texts)
    assert g.grown > 0  # the ends were computed for some, as in use
    assert 0 < _memory(g) <= g.bytes <= 64 << 10


def test_code_still_fills_the_bound_with_many_texts(front):
    """The negative beside it: texts of code (~0.3 tokens a byte) are kept, several users' worth, not refused."""
    from pathlib import Path

    src = (Path(__file__).resolve().parents[2] / "src" / "codemoat" / "engines" / "tokgrow.py").read_text()[:4000]
    g = TokenGrowth(max_bytes=256 << 10)
    _grow_through(front, g, [(f"u{u}", src[: 2000 + 40 * k]) for u in range(4) for k in range(4)])
    assert sum(len(v) for v in g._scopes.values()) == 16 and len(src[:2000].encode()) >= MIN_BYTES
    assert g.grown >= 12 and _memory(g) <= g.bytes <= 256 << 10
