"""A long text a caller sent a moment ago is not tokenised again (`engines.tokcache`), only within that caller's
scope, with the ids llama.cpp's tokenizer gives, and within its bound."""

from __future__ import annotations

import threading

import pytest

from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.engines.templates import Part
from codemoat.engines.tokcache import ENTRY_CHARS, MIN_CHARS, SCOPE, TokenCache

SUFFIX = "    return total\n\n\ndef handler_refund(order, amount_cents):\n" * 20  # the text after an editor's cursor


@pytest.fixture
def front(tiny_gguf):
    e = LlamaCppEngine.front(str(tiny_gguf))
    yield e
    e.close()


def _as(user: str | None, front, parts, bos=False):
    token = SCOPE.set(user)
    try:
        return front.encode(parts, bos=bos)
    finally:
        SCOPE.reset(token)


def test_a_users_unchanged_suffix_is_tokenised_once(front, tokenised):
    want = front._model.tokenize(SUFFIX.encode(), add_bos=False, special=False)
    assert (
        _as("alice", front, [Part("def f(x):\n", False), Part(SUFFIX, False)])
        == front.encode([Part("def f(x):\n", False)], bos=False) + want
    )
    tokenised.clear()
    got = _as("alice", front, [Part("def f(x):\n  y", False), Part(SUFFIX, False)])  # three characters typed
    assert tokenised == [len(b"def f(x):\n  y")]  # the prefix only: the suffix came from the cache
    assert got[-len(want) :] == want
    got.append(99)  # a caller that changes what it got changes nothing kept
    assert _as("alice", front, [Part(SUFFIX, False)]) == want
    assert front.token_cache().hits == 2


def test_another_user_never_gets_a_text_someone_else_sent(front, tokenised):
    """Whether bob's request is faster must not tell him that alice just sent the same text."""
    _as("alice", front, [Part(SUFFIX, False)])
    tokenised.clear()
    assert _as("bob", front, [Part(SUFFIX, False)]) == _as("alice", front, [Part(SUFFIX, False)])
    assert tokenised == [len(SUFFIX.encode())]  # bob's was tokenised; alice's came from her own entry


def test_no_scope_no_cache_and_short_texts_are_not_kept(front, tokenised):
    front.encode([Part(SUFFIX, False)], bos=False)
    front.encode([Part(SUFFIX, False)], bos=False)
    short = "x" * (MIN_CHARS - 1)
    _as("alice", front, [Part(short, False)])
    _as("alice", front, [Part(short, False)])
    assert len(tokenised) == 4 and len(front.token_cache()) == 0


def test_special_and_plain_readings_of_one_text_are_kept_apart(front):
    text = "<|fim_prefix|>" + "x = 1\n" * 60  # control-token text: parsed as one token only when special
    plain = _as("alice", front, [Part(text, False)])
    special = _as("alice", front, [Part(text, True)])
    assert plain == front._model.tokenize(text.encode(), add_bos=False, special=False)
    assert special == front._model.tokenize(text.encode(), add_bos=False, special=True)
    assert _as("alice", front, [Part(text, False)]) == plain and _as("alice", front, [Part(text, True)]) == special


def test_the_cache_holds_at_most_its_characters_least_recently_used_first():
    c = TokenCache(max_chars=3 * (300 + ENTRY_CHARS))
    for i in range(5):
        c.put("alice", False, str(i) * 300, [i])
    assert c.chars <= c.max_chars and len(c) == 3
    assert c.get("alice", False, "0" * 300) is None and c.get("alice", False, "4" * 300) == [4]
    c.get("alice", False, "2" * 300)  # used: the oldest is now 3
    c.put("bob", False, "b" * 300, [7])
    assert c.get("alice", False, "3" * 300) is None and c.get("alice", False, "2" * 300) == [2]
    big = "y" * (c.max_chars - ENTRY_CHARS + 1)  # larger than the whole cache with its entry: never kept
    c.put("alice", False, big, [1])
    assert c.get("alice", False, big) is None and c.chars <= c.max_chars


def test_a_short_prompt_sent_again_is_not_tokenised_again(front, tokenised):
    """A whole prompt of a few lines (an editor asking again for the completion it cancelled): cold, its
    tokenising was ~5 % of a one-client first token; within the caller's own scope only."""
    prompt = "import os\n\ndef walk(root):\n    for d, _, files in os.walk(root):\n"
    want = front._model.tokenize(prompt.encode(), add_bos=False, special=False)
    assert MIN_CHARS <= len(prompt) < 256
    assert _as("alice", front, [Part(prompt, False)]) == want
    tokenised.clear()
    assert _as("alice", front, [Part(prompt, False)]) == want
    assert tokenised == []  # from alice's entry
    assert _as("bob", front, [Part(prompt, False)]) == want
    assert tokenised == [len(prompt.encode())]  # bob's own: never alice's


def test_a_flood_of_tiny_texts_is_bounded_by_entries_not_only_characters():
    """Each entry costs its key, array and dict slot whatever its length: 16-character texts by the million
    must not hold gigabytes under a budget counted in characters."""
    c = TokenCache(max_chars=8_000)
    for i in range(10_000):
        c.put("mallory", False, f"{i:0{MIN_CHARS}d}", [i])
    assert 0 < len(c) <= 8_000 // (MIN_CHARS + 64) and c.chars <= c.max_chars  # >= 64 characters an entry


def test_threads_tokenising_at_once_get_llama_cpps_ids(front):
    """The server's worker threads build prompts at the same time (long prompts are built off the loop)."""
    texts = [SUFFIX + str(i) * 300 for i in range(6)]
    want = {t: front._model.tokenize(t.encode(), add_bos=False, special=False) for t in texts}
    bad: list[str] = []

    def work(user: str) -> None:
        for _ in range(20):
            for t in texts:
                if _as(user, front, [Part(t, False)]) != want[t]:
                    bad.append(user)

    threads = [threading.Thread(target=work, args=(u,)) for u in ("alice", "bob", "alice")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not bad and not any(t.is_alive() for t in threads)
