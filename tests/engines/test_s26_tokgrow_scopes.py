"""`engines.tokgrow`'s counts and its giving up (session 26).

Was: the counts /metrics reads (`codemoat_tokenizer_long_texts_total`: `grown`, `whole`; and `failed`, `passed`)
were `+= 1` outside the lock, so requests tokenised at once on the server's threads could lose some; and the
give-up count was the vocabulary's: one user whose edits kept failing the check switched growth off for every
user. Now: the counts change under the lock, exact whatever the threads; and giving up is per scope.

CPython 3.11 lets another thread run only at a call or a loop's end, so a bare `+= 1` of an int seldom loses a
count in the tests' interpreter (it does in a free-threaded one); the threaded test's counts are ints that let
another thread run between the read and the write, as a thread switch there does."""

from __future__ import annotations

import threading
import time

from codemoat.engines.tokgrow import GIVE_UP, TokenGrowth

LINES = [f"line {i:4d} = {i:3d}\n".encode() for i in range(400)]  # 16 bytes each: `_lengths`
MARKED = [b"#" + x[1:] for x in LINES]  # lines a tokenizer reads otherwise at a text's start: see `_native`


def _native(b: bytes, special: bool) -> list[int]:
    """A tokenizer of whole lines (one token each, its newline included) that reads a text's first line otherwise
    when it starts with `#` (as SentencePiece's space prefix does for every text): a text of `MARKED` lines fails the
    check at every cut, one of `LINES` passes it."""
    lines = b.splitlines(keepends=True)
    return [hash((i == 0 and x.startswith(b"#"), x)) & 0x7FFFFFFF for i, x in enumerate(lines)]


def _lengths(ids, special):
    return [16] * len(ids)


class _Yielding(int):
    """A count whose `+ 1` lets another thread run between reading it and the write of the sum."""

    def __add__(self, other):
        time.sleep(0)
        return _Yielding(int(self) + other)


def _type(g: TokenGrowth, user: str, lines: list[bytes], first: int, n: int) -> None:
    """`user` types `n` lines, one a request, after the `first` lines: each text's ids are the whole tokenisation's."""
    for k in range(first, first + n):
        text = b"".join(lines[:k])
        assert g.tokenise(user, False, text, _native, _lengths) == _native(text, False)


def test_counts_are_exact_with_several_threads_at_once():
    g = TokenGrowth()
    g.grown = g.whole = g.failed = g.passed = _Yielding(0)
    threads, n = 8, 60
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def user(u: int) -> None:
        try:
            start.wait()
            _type(g, f"u{u}", MARKED if u == 0 else LINES, 100, n)  # u0's checks fail, the others' pass
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread
            errors.append(e)

    ts = [threading.Thread(target=user, args=(u,)) for u in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    # each user's first text whole; u0's next GIVE_UP fail the check (whole), then it is not tried (whole)
    assert g.passed == g.grown == (threads - 1) * (n - 1)
    assert g.failed == GIVE_UP
    assert g.whole == threads + (n - 1)
    assert g.grown + g.whole == threads * n  # every long text counted once


def test_counts_one_thread():
    """The negative beside it: one thread's counts are what they were, `grown` and `whole` as /metrics shows them."""
    g = TokenGrowth()
    _type(g, "alice", LINES, 100, 10)
    assert (g.grown, g.whole, g.passed, g.failed) == (9, 1, 9, 0)


def test_one_users_failed_checks_do_not_switch_growth_off_for_another():
    g = TokenGrowth()
    _type(g, "mallory", MARKED, 100, GIVE_UP + 4)  # her edits fail the check: she is given up on
    assert g.grown == 0 and g.failed == GIVE_UP and g.passed == 0
    _type(g, "bob", LINES, 100, 10)  # was: tokenised whole, the vocabulary given up on for everyone
    assert g.grown == 9 and g.passed == 9


def test_a_user_whose_checks_fail_is_still_given_up_on():
    """The negative: giving up still happens, for the scope whose checks fail, even while others' pass."""
    g = TokenGrowth()
    _type(g, "bob", LINES, 100, 5)
    _type(g, "mallory", MARKED, 100, GIVE_UP + 10)
    assert g.failed == GIVE_UP  # not one more try after her GIVE_UP-th failure, though bob's passed
    _type(g, "bob", LINES, 105, 5)
    assert g.grown == 9 and g.failed == GIVE_UP


def test_a_scope_pushed_out_is_tried_again_with_its_texts():
    """A scope's count goes with its texts (the counts are bounded as the texts are): pushed out by others' texts,
    it is tried again, `GIVE_UP` more times at most."""
    g = TokenGrowth(max_bytes=20_000)  # her 4 latest texts (~14,000 bytes held), and few more
    _type(g, "mallory", MARKED, 100, GIVE_UP + 2)
    assert g.failed == GIVE_UP and ("mallory", False) in g._checks
    for u in range(4):
        _type(g, f"u{u}", LINES, 100, 2)
    assert ("mallory", False) not in g._scopes and ("mallory", False) not in g._checks
    _type(g, "mallory", MARKED, 100, GIVE_UP + 3)
    assert g.failed == 2 * GIVE_UP
