"""Search terms for code: identifiers kept whole and split into their words.

BM25 over code works better when `parse_http_header` also matches a query that says `header`, and
`HTTPClient` matches `client`; both the index and the queries use this one function so they agree.
Language keywords and one-letter names are dropped: they match everything and slow FTS5 down.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable

_IDENT = re.compile(r"[^\W\d]\w*")
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")

STOPWORDS = frozenset(
    """
    and as assert async await break case catch class const continue def default del do elif else
    end enum except export extends false final finally fn for from func function go if impl import
    in instanceof interface is lambda let match mod module mut new nil none not null or package pass
    private protected pub public raise return self static struct super switch this throw throws true
    try type typeof use using val var void while with yield int str bool string float char long
    double byte get set args kwargs cls the of to an be it on at by we that
    """.split()
)

# Names already split. It outlives requests, whose prefixes and questions are any client's text, so it
# is bounded in bytes, not only in entries: a name longer than CACHE_CHARS is split anew each time (a
# megabyte-long "identifier" was kept with its words, ~8x its size, for good), and the cache starts over
# once it holds about CACHE_BYTES (500,000 names of 64 capitalised letter pairs held 1.2 GB).
_cache: dict[str, tuple[str, ...]] = {}
_cached_bytes = 0
CACHE_CHARS = 64
CACHE_BYTES = 64 << 20


def _footprint(ident: str, res: tuple[str, ...]) -> int:
    """About what an entry costs in memory: the key, the tuple, each word (CPython object headers included)
    and its dict slot. sys.getsizeof, not the length: a name of letters outside the BMP (\\w, 4 bytes a
    character) holds 4x its length twice (key and lowered word), 2.5x what counting 1 byte a character said."""
    return sys.getsizeof(ident) + sys.getsizeof(res) + sum(sys.getsizeof(w) for w in res) + 32


def split_identifier(ident: str) -> tuple[str, ...]:
    """`parse_HTTPHeader` -> ('parse_httpheader', 'parse', 'http', 'header'); keywords -> ()."""
    hit = _cache.get(ident)
    if hit is not None:
        return hit
    low = ident.lower()
    out: list[str] = []
    if len(low) > 1 and low not in STOPWORDS:
        out.append(low)
    words = [w.lower() for part in ident.split("_") for w in _WORD.findall(part)]
    if len(words) > 1:
        out.extend(w for w in words if len(w) > 1 and w not in STOPWORDS and not w.isdigit())
    res = tuple(out)
    if len(ident) <= CACHE_CHARS:
        global _cached_bytes
        size = _footprint(ident, res)
        if _cached_bytes + size > CACHE_BYTES:
            _cache.clear()
            _cached_bytes = 0
        _cache[ident] = res
        _cached_bytes += size
    return res


def identifiers(text: str) -> list[str]:
    """Every identifier-like token of `text`, in order."""
    return _IDENT.findall(text)


def terms(text: str) -> list[str]:
    """The search terms of `text` (with repeats, so BM25 sees term frequency)."""
    out: list[str] = []
    ext = out.extend
    for ident in _IDENT.findall(text):
        ext(split_identifier(ident))
    return out


def path_terms(path: str) -> list[str]:
    """Terms of a file path: `src/http_client/Pool.ts` -> src, http_client, http, client, pool, ts."""
    return terms(re.sub(r"[/\\.\-]", " ", path))


def unique_terms(texts: Iterable[str], limit: int = 64) -> list[str]:
    """Distinct terms of `texts`, first seen first, at most `limit`."""
    seen: dict[str, None] = {}
    for t in texts:
        for term in terms(t):
            if term not in seen:
                seen[term] = None
                if len(seen) >= limit:
                    return list(seen)
    return list(seen)
