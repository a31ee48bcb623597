"""Outlines and the symbol-side signals behind them, for `Retriever` (a mixin: it uses the
retriever's `_store` and `_bm25`).

An outline is what an IDE's completion list shows: signatures with the first sentence of their
docstrings. After `module.` it lists a module's own definitions and those it re-exports (followed
through `__init__` files, one outline per defining file); after `Class.` a class's methods, those
called on the class first. Members are ranked by their use as `owner.x` in this file, by what the
most similar code in other files calls on that owner (RepoCoder, Zhang et al. 2023), and by
popularity (how many chunks name them). Each repository file this file imports two or more names
from gets an outline too. Module paths are matched here as well (`_stem`, `_path_match`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache

from ..index.store import ChunkRow, SymbolRow
from .query import Query, _imports

SYMBOL_BM25_FLOOR = 0.25  # a symbol candidate's score is multiplied by floor + its normalised BM25
OUTLINE_ITEMS = 30
OUTLINE_BOOST = 1.5  # an import outline scores this times its best item
REEXPORT_HOPS = 3
REEXPORT_IMPLICIT = 0.3  # weight of a name a module imports for its own use, against one it re-exports
NAME_MATCH = 4.0  # a candidate whose name the cursor's line already says weighs up to 1 + this times more
EXPECT_FIT = 3.0  # a candidate of the kind the syntax at the cursor expects (`raise` -> an exception class)
SIMILAR_CHUNKS = 20  # the best BM25 chunks read for what similar code calls on the owner
SIMILAR_USE = 2.0  # weight of a member per similar chunk that calls it (scaled by its BM25 score)
STATIC_ONLY = 0.3  # weight of an instance method after `Class.`, against one called on the class
_REEXPORT = re.compile(r"\b(\w+)\s+as\s+\1\b")  # `from .m import x as x`: PEP 484's explicit re-export


class Outlines:
    """Outline building and member ranking; mixed into `Retriever`."""

    def _outlines(self, q: Query, repo_ids: Sequence[int], current: str | None) -> list[tuple[ChunkRow, set[int]]]:
        """After `owner.`: the signatures of owner's members, likeliest first (at most OUTLINE_ITEMS),
        as an IDE's completion list shows them. For a module, its top-level definitions and those it
        re-exports, one outline per file that defines them; for a class, its methods under its header."""
        if q.owner is None:
            return []
        found = self._members(q, repo_ids)
        reach = {s.chunk_id: r for s, r in found}
        members = [s for s, _r in found if s.path != current and not (s.name.startswith("__") and s.name.endswith("__"))]
        if not members:
            return []
        rel = self._bm25(q, repo_ids)
        best = max(rel.values(), default=0.0) or 1.0
        df = self._store.doc_freq(s.name.lower() for s in members)
        uses = self._similar_uses(q, repo_ids, current)
        kinds = {"class": 1.0, "function": 1.0, "type": 0.7, "variable": 0.4}

        def likely(s: SymbolRow) -> float:
            """Seen as owner.name in this file first; then public definitions used widely (how many
            chunks mention the name: a popularity prior) that resemble the code at the cursor."""
            kind = (1.0 if _static_like(s) else STATIC_ONLY) if s.kind == "method" else kinds.get(s.kind, 0.7)
            prior = kind * (0.5 if s.name.startswith("_") else 1.0) * reach[s.chunk_id]
            prior *= 1.0 + math.log1p(df.get(s.name.lower(), 0))
            prior *= SYMBOL_BM25_FLOOR + rel.get(s.chunk_id, 0.0) / best
            prior *= _fitness(q, s)
            prior *= 1.0 + SIMILAR_USE * uses.get(s.name, 0.0)
            return q.member_weights.get(s.name, 0.0) * 100.0 + prior

        ranked = sorted(members, key=lambda s: -likely(s))[:OUTLINE_ITEMS]
        out = []
        for cls in q.cache.get(("classes", tuple(repo_ids)), []):
            items = [s for s in ranked if s.path == cls.path and cls.start_line < s.start_line <= cls.end_line]
            if items:
                indent = " " * 4 if cls.path.endswith(".py") else "  "
                text = "\n".join([cls.signature, *(indent + _outline_line(s) for s in items)])
                out.append((ChunkRow(-items[0].chunk_id, cls.repo_id, cls.path, cls.start_line,
                                     max(s.end_line for s in items), "outline", cls.qualname, text),
                            {s.chunk_id for s in items}))  # fmt: skip
        if out:
            return out
        by_path: dict[str, list[SymbolRow]] = {}
        for s in ranked:
            by_path.setdefault(s.path, []).append(s)
        for path, items in by_path.items():
            s0 = items[0]
            text = "\n".join(_outline_line(s) for s in items)
            out.append((ChunkRow(-s0.chunk_id, s0.repo_id, path, min(s.start_line for s in items),
                                 max(s.end_line for s in items), "outline", q.owner or "", text),
                        {s.chunk_id for s in items}))  # fmt: skip
        return out

    def _similar_uses(self, q: Query, repo_ids: Sequence[int], current: str | None) -> dict[str, float]:
        """member -> how much the code most like the cursor's (the best BM25 chunks of other files) uses
        `owner.member`: what similar code calls next (RepoCoder's retrieval of similar code, Zhang et al. 2023)."""
        self._bm25(q, repo_ids)
        hits = q.cache["hits"][:SIMILAR_CHUNKS]
        if not hits or q.owner is None:
            return {}
        best = hits[0][1] or 1.0
        rows = self._store.chunks([cid for cid, _ in hits])
        member = re.compile(re.escape(q.owner) + r"\s*(?:\.|::|->)\s*([^\W\d]\w*)")
        uses: dict[str, float] = {}
        for cid, sc in hits:
            c = rows.get(cid)
            if c is None or c.path == current:  # this file's own text may hold what is being typed
                continue
            for name in set(member.findall(c.text)):
                uses[name] = uses.get(name, 0.0) + sc / best
        return uses

    def _module_files(self, frag: str, repo_ids: Sequence[int]) -> list[tuple[int, str]]:
        """(file id, path) of the module at path fragment `frag`: exact matches if any, else suffix matches."""
        st = self._store
        if not frag:
            files = [(st.file_id(rid, p), p) for rid in repo_ids for p in ("__init__.py",)]
            return [(fid, p) for fid, p in files if fid is not None]
        files = [(fid, p) for fid, p in st.files_matching(frag.rsplit("/", 1)[-1], repo_ids) if _path_match(_stem(p), frag)]
        exact = [(fid, p) for fid, p in files if _stem(p) == frag]
        return exact or files

    def _reexports(self, paths: Sequence[str], repo_ids: Sequence[int]) -> list[tuple[SymbolRow, float]]:
        """Definitions a module imports from elsewhere in the repository and so exposes as its own
        (a package's `__init__` re-exporting its submodules' API), followed through up to REEXPORT_HOPS
        modules that re-export in turn."""
        out: list[tuple[SymbolRow, float]] = []
        want: dict[str, set[str]] = {}  # name -> module path fragments it is imported from
        reach: dict[str, float] = {}
        for path in paths[:3]:
            text = self._import_text(repo_ids, path)
            names, _mods = _imports(text, path)
            # A package's `__init__` exports what it imports; another module, what it imports `as` the
            # same name (PEP 484's explicit re-export); the rest it imports for its own use.
            explicit = set(names) if _PACKAGE_FILE.search(path) else set(_REEXPORT.findall(text))
            for n, frags in names.items():
                want.setdefault(n, set()).update(frags)
                reach[n] = max(reach.get(n, 0.0), 1.0 if n in explicit else REEXPORT_IMPLICIT)
        for _hop in range(REEXPORT_HOPS):
            if not want:
                break
            found: set[str] = set()
            for s in self._store.lookup_symbols(list(want)[:300], repo_ids, limit=2000):
                if "." not in s.qualname and s.path not in paths and any(_path_match(_stem(s.path), f) for f in want[s.name]):
                    out.append((s, reach.get(s.name, REEXPORT_IMPLICIT)))
                    found.add(s.name)
            # Names not defined where they are imported from: that module re-exports them in turn.
            by_frag: dict[str, list[str]] = {}
            for n, frags in want.items():
                if n not in found:
                    for f in frags:
                        by_frag.setdefault(f, []).append(n)
            nxt: dict[str, set[str]] = {}
            for frag, ns in sorted(by_frag.items(), key=lambda kv: -len(kv[1]))[:4]:
                for _fid, p in self._module_files(frag, repo_ids)[:1]:
                    names, _mods = _imports(self._import_text(repo_ids, p), p)
                    for n in ns:
                        if n in names:
                            nxt.setdefault(n, set()).update(names[n])
            want = nxt
        return out

    def _import_text(self, repo_ids: Sequence[int], path: str) -> str:
        """The module-level code of a file (its imports among it)."""
        return "\n".join(c.text for rid in repo_ids for c in self._store.file_chunks(rid, path) if c.kind == "module")

    def _members(self, q: Query, repo_ids: Sequence[int]) -> list[tuple[SymbolRow, float]]:
        """Members of the module or class named just before the cursor (`owner.`), each with how surely
        the owner exposes it (1, or REEXPORT_IMPLICIT for a name it merely imports)."""
        if q.owner is None:
            return []
        key = ("members", tuple(repo_ids))
        if key in q.cache:
            return q.cache[key]
        st = self._store
        rows: list[tuple[SymbolRow, float]] = []
        if q.owner_module is not None:
            files = self._module_files(q.owner_module, repo_ids)
            rows = [(s, 1.0) for s in st.symbols_in([fid for fid, _ in files]) if "." not in s.qualname]
            rows += self._reexports([p for _, p in files], repo_ids)
        classes = []
        if not rows:
            found = [c for c in st.lookup_symbols([q.owner], repo_ids) if c.kind == "class"]
            # The class from the module it is imported from; any of that name when that module re-exports it.
            hinted = [c for c in found if any(_path_match(_stem(c.path), h) for h in q.owner_hints)]
            for cls in hinted or found:
                fid = st.file_id(cls.repo_id, cls.path)
                if fid is not None:
                    classes.append(cls)
                    rows += [(s, 1.0) for s in st.symbols_in([fid], cls.start_line + 1, cls.end_line) if s.kind == "method"]
        q.cache[key] = rows
        q.cache[("classes", tuple(repo_ids))] = classes[:3]
        return rows

    def _import_outlines(self, q: Query, repo_ids: Sequence[int], current: str | None, fused: dict[int, float],
                         rows: dict[int, ChunkRow]) -> list[tuple[ChunkRow, float, set[int]]]:  # fmt: skip
        """One outline per repository file this file imports two or more names from: their signatures,
        likeliest first (what an IDE shows as the imported declarations)."""
        imported = [n for n, mods in q.hints.items() if mods and n in q.weights]
        by_path: dict[str, list[tuple[float, SymbolRow]]] = {}
        for s in self._store.lookup_symbols(imported, repo_ids, limit=2000):
            if s.path == current or s.kind == "method":
                continue
            if any(_path_match(_stem(s.path), frag) for frag in q.hints[s.name]):
                by_path.setdefault(s.path, []).append((q.weights[s.name] * _fitness(q, s), s))
        out = []
        for path, items in by_path.items():
            if len({s.name for _, s in items}) < 2:
                continue
            items.sort(key=lambda ws: -ws[0])
            items = items[:OUTLINE_ITEMS]
            best = max((fused.get(s.chunk_id, 0.0) for _, s in items), default=0.0)
            if best <= 0:
                continue
            s0 = items[0][1]
            text = "\n".join(_outline_line(s) for _, s in items)
            row = ChunkRow(-s0.chunk_id, s0.repo_id, path, min(s.start_line for _, s in items),
                           max(s.end_line for _, s in items), "outline", "", text)  # fmt: skip
            out.append((row, best * OUTLINE_BOOST, {s.chunk_id for _, s in items}))
        return out


def _fitness(q: Query, s: SymbolRow) -> float:
    """How much better a candidate fits the cursor than its weight says: its name on the cursor's line,
    the kind of definition the syntax there expects."""
    return (1.0 + NAME_MATCH * q.name_match(s.name)) * (EXPECT_FIT if q.fits(s.kind, s.name, s.signature) else 1.0)


def _static_like(s: SymbolRow) -> bool:
    """A method one calls on its class (`Class.m(`): a Python method whose first parameter is not
    `self`, or one declared `static`."""
    if s.path.endswith((".py", ".pyi")):
        return not re.match(r"\s*(?:async\s+)?def\s+\w+\s*\(\s*self\b", s.signature)
    return bool(re.search(r"\bstatic\b", s.signature))


def _outline_line(s: SymbolRow) -> str:
    """A signature with the first sentence of its docstring as a trailing comment."""
    if not s.doc:
        return s.signature
    first = s.doc.split(". ")[0].split("\n")[0].strip().rstrip(".")[:100]
    mark = "#" if s.path.endswith((".py", ".rb", ".sh")) else "//"
    return f"{s.signature}  {mark} {first}"


_PACKAGE_FILE = re.compile(r"(^|/)(__init__|index|mod)\.\w+$")  # a folder's module: Python, JS/TS, Rust


class _Fragments:
    """Many module path fragments, matched against a path as `_path_match` does, in time that does not
    grow with their number."""

    def __init__(self, frags: set[str]):
        self.frags = frags
        self.tails = {frag.split("/", i)[-1] for frag in frags for i in range(1, frag.count("/") + 1)}
        self._memo: dict[str, bool] = {}

    def match(self, stem: str) -> bool:
        hit = self._memo.get(stem)
        if hit is None:
            if not stem:  # a repository's root package
                hit = "" in self.frags
            else:  # the stem is a fragment or ends one, or a fragment ends the stem
                parts = stem.split("/")
                hit = (
                    stem in self.frags
                    or stem in self.tails
                    or any("/".join(parts[i:]) in self.frags for i in range(1, len(parts)))
                )
            self._memo[stem] = hit
        return hit


@lru_cache(maxsize=65536)
def _stem(path: str) -> str:
    """The module path of a file: `pkg/__init__.py` -> `pkg`, `a/b.py` -> `a/b`, `__init__.py` -> ``."""
    return _PACKAGE_FILE.sub("", path) if _PACKAGE_FILE.search(path) else re.sub(r"\.\w+$", "", path)


def _path_match(stem: str, frag: str) -> bool:
    """True when one module path ends the other at a component boundary (`httpx/_models` ~ `_models`);
    an empty path is a repository's root package."""
    if not frag or not stem:
        return stem == frag
    return stem == frag or stem.endswith("/" + frag) or frag.endswith("/" + stem)
