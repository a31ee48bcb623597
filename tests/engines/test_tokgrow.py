"""A text that grew from one the same caller tokenised a moment ago (an editor's prefix, a keystroke longer) is
tokenised from a line start before the change only (`engines.tokgrow`), and gets exactly the ids a whole
tokenisation gives: compared over thousands of random edits of real code with llama.cpp's own tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.engines.templates import Part
from codemoat.engines.tokcache import SCOPE
from codemoat.engines.tokgrow import GIVE_UP, MARGIN, MIN_BYTES, TOKEN_BYTES, TokenGrowth, common_prefix, held

SRC = Path(__file__).resolve().parents[2] / "src" / "codemoat"


@pytest.fixture(scope="module")
def front(tiny_gguf):
    e = LlamaCppEngine.front(str(tiny_gguf))
    yield e
    e.close()


def _as(user: str, front, text: str, special: bool = False) -> list[int]:
    token = SCOPE.set(user)
    try:
        return front.encode([Part(text, special)], bos=False)
    finally:
        SCOPE.reset(token)


def _whole(front, text: str, special: bool = False) -> list[int]:
    return front._model.tokenize(text.encode(), add_bos=False, special=special)


def _corpus() -> list[str]:
    files = sorted(SRC.rglob("*.py"))
    return [f.read_text() for f in files if 6_000 < f.stat().st_size < 40_000][:12]


def test_common_prefix_is_exact_at_every_length():
    rng = random.Random(5)
    for _ in range(400):
        n = rng.choice([0, 1, 7, 4095, 4096, 4097, 9000])
        a = bytes(rng.randrange(256) for _ in range(n))
        k = rng.randrange(n + 1)
        b = a[:k] + (bytes([(a[k] + 1) % 256]) if k < n else b"") + bytes(rng.randrange(256) for _ in range(rng.randrange(5)))
        assert common_prefix(a, b) == k and common_prefix(b, a) == k


def test_typing_through_real_files_gives_the_whole_tokenisations_ids(front, tokenised):
    """An editor's keystrokes: the prefix grows by 1-6 characters, now and then a backspace, an edit a few lines
    up, or a jump to another place. Every request's ids equal llama.cpp's whole tokenisation; most are grown."""
    rng = random.Random(24)
    growth = front.token_growth()
    grown0, tokenised_bytes, whole_bytes = growth.grown, 0, 0
    for n_file, src in enumerate(_corpus()):
        at = rng.randrange(MIN_BYTES, 2 * MIN_BYTES)
        text = src[:at]
        for _ in range(60):
            r = rng.random()
            if r < 0.75:  # typing on
                at = min(len(src), at + rng.randrange(1, 7))
                text = text + src[len(text) : at] if text == src[: len(text)] else text + src[at - 3 : at]
            elif r < 0.85:  # backspace
                text = text[: -rng.randrange(1, 4)]
            elif r < 0.95:  # an edit a few lines up
                k = max(0, len(text) - rng.randrange(20, 400))
                text = text[:k] + rng.choice(["x", "_", " ", "\n", "é", "\t", "):\n    "]) + text[k + 1 :]
            else:  # somewhere else in the file
                at = rng.randrange(MIN_BYTES, len(src))
                text = src[:at]
            tokenised.clear()
            got = _as(f"dev{n_file % 3}", front, text)
            assert got == _whole(front, text), (n_file, len(text))
            tokenised_bytes += sum(tokenised)
            whole_bytes += len(text.encode())
    grown = growth.grown - grown0
    assert grown > 400, grown  # the path under test was taken, not only the whole tokenisation
    assert tokenised_bytes < whole_bytes / 4  # what it is for: most bytes were not tokenised again


def test_special_texts_grow_to_the_same_ids_too(front):
    """A text tokenised with special tokens parsed (a FIM template's part) grows apart from its plain reading."""
    body = (SRC / "engines" / "tokgrow.py").read_text()[:3000]
    for special in (True, False):
        for extra in ("", "x", "x = 1\n", "x = 1\ny = 2"):
            text = "<|fim_prefix|>" + body + extra
            assert _as("alice", front, text, special) == _whole(front, text, special)


def test_another_users_text_is_never_grown_from(front, tokenised):
    """Whether bob's prefix is tokenised fast must not tell him that alice just sent the same file."""
    text = _corpus()[0][:3000]
    _as("alice", front, text)
    tokenised.clear()
    assert _as("bob", front, text + "def") == _whole(front, text + "def")
    assert tokenised == [len((text + "def").encode())]  # whole: bob has no text of his own to grow from
    tokenised.clear()
    assert _as("alice", front, text + "def") == _whole(front, text + "def")
    assert sum(tokenised) < 2 * (MARGIN + 200)  # alice's own: the old tail checked, then the new one


def _lines_tokenizer(prefixed: bool):
    """A tokenizer of whole lines (each line one token, its newline included), with its tokens' byte lengths — or,
    `prefixed`, one that reads a text's first line otherwise (as SentencePiece's space prefix does): a cut at a
    line start then does not give the whole text's ids."""

    def native(b: bytes, special: bool) -> list[int]:
        lines = b.splitlines(keepends=True)
        return [hash((prefixed and i == 0, x)) & 0x7FFFFFFF for i, x in enumerate(lines)]

    def lengths(ids, special):  # the texts are lines of 16 bytes each: see the test
        return [16] * len(ids)

    return native, lengths


def test_a_tokenizer_that_does_not_split_at_line_starts_fails_the_check_and_is_tokenised_whole():
    """The check, not the cut's rule, decides: where the new text tokenised from the cut does not begin with the old
    ids of the part both share, the new text is tokenised whole (its ids are the whole tokenisation's), and after `GIVE_UP` failures with
    no pass the vocabulary is not tried again."""
    lines = [f"line {i:4d} = {i:3d}\n".encode() for i in range(300)]
    assert {len(x) for x in lines} == {16}
    for prefixed in (False, True):
        native, lengths = _lines_tokenizer(prefixed)
        g = TokenGrowth()
        g.tokenise("alice", False, b"".join(lines[:150]), native, lengths)
        for k in range(151, 151 + GIVE_UP + 4):
            text = b"".join(lines[:k])
            assert g.tokenise("alice", False, text, native, lengths) == native(text, False)
        if prefixed:
            assert g.grown == 0 and g.failed == GIVE_UP and g.passed == 0  # then no more tries
        else:
            assert g.grown == GIVE_UP + 4 and g.failed == 0


def test_the_texts_held_are_bounded_per_scope_and_in_all():
    one = MIN_BYTES * (1 + TOKEN_BYTES)  # a text of a token a byte: its bytes, ids and token ends
    g = TokenGrowth(max_bytes=10 * one)
    native = lambda b, special: list(b)  # noqa: E731
    for user in range(8):
        for k in range(6):
            g.tokenise(f"u{user}", False, bytes([65 + k]) * MIN_BYTES, native, lambda ids, s: None)
    kept = sum(held(x) for v in g._scopes.values() for x in v)
    assert kept == g.bytes <= 10 * one
    assert all(len(v) <= 4 for v in g._scopes.values()) and "u7" in {k[0] for k in g._scopes}
