"""Cross-file context for completions and chat, filtered by the caller's groups.

For a completion: the identifiers in use are looked up in the symbol table, the last lines are
searched with BM25 over the chunks, and the two rankings are fused by weighted reciprocal rank
(Cormack et al. 2009, "Reciprocal Rank Fusion outperforms Condorcet and individual rank learning
methods"; k = 60 there, a smaller k here because only the top few matter). Symbol candidates are
weighed by how likely the next name is theirs: imported and not yet used, or used in the last lines;
named on the cursor's line (`request = ` ~ `Request`); of the kind the syntax there expects (an
exception class after `raise`, a predicate after `if`).

Outlines (signatures with the first sentence of their docstrings, as an IDE's completion list) come
first when the cursor follows `owner.`: a module's own definitions and those it re-exports (followed
through `__init__` files, one outline per defining file), or a class's methods, those called on the
class first; members ranked by their use as `owner.x` in this file, by what the most similar code in
other files calls on that owner (RepoCoder, Zhang et al. 2023), and by popularity (how many chunks
name them). Each repository file this file imports two or more names from gets an outline too.

Chunks that overlap the part of the file the request already carries are dropped, duplicates are
dropped, chunks whose signature an outline above shows count less, and the rest are fitted into the
token budget. No snippet ever comes from a repository the caller may not read
(`acl.can_read`): unreadable repositories are removed before any query, and every chunk is checked
again on its way out.
"""

from __future__ import annotations

import math
import posixpath
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from ..index.store import ChunkRow, RepoInfo, SqliteIndex, SymbolRow, default_path
from .acl import can_read
from .fit import approx_tokens, fit_lines
from .query import Query, _imports, chat_query, completion_query

RRF_K = 3
W_SYMBOLS = 1.0
W_BM25 = 0.8
CANDIDATES = 40  # per ranking
BM25_POOL = 300  # BM25 hits whose scores also rerank symbol candidates
SYMBOL_BM25_FLOOR = 0.25  # a symbol candidate's score is multiplied by floor + its normalised BM25
OUTLINE_ITEMS = 30
OUTLINE_BOOST = 1.5  # an import outline scores this times its best item
COVERED = 0.5  # a chunk whose signature an outline above shows already: the outline took its place
REEXPORT_HOPS = 3
REEXPORT_IMPLICIT = 0.3  # weight of a name a module imports for its own use, against one it re-exports
NAME_MATCH = 4.0  # a candidate whose name the cursor's line already says weighs up to 1 + this times more
EXPECT_FIT = 3.0  # a candidate of the kind the syntax at the cursor expects (`raise` -> an exception class)
SIMILAR_CHUNKS = 20  # the best BM25 chunks read for what similar code calls on the owner
SIMILAR_USE = 2.0  # weight of a member per similar chunk that calls it (scaled by its BM25 score)
STATIC_ONLY = 0.3  # weight of an instance method after `Class.`, against one called on the class
_REEXPORT = re.compile(r"\b(\w+)\s+as\s+\1\b")  # `from .m import x as x`: PEP 484's explicit re-export
REPO_CACHE_S = 2.0


@dataclass(frozen=True)
class Snippet:
    """One piece of retrieved code; lines are 1-based and inclusive."""

    repo: str
    path: str
    start_line: int
    end_line: int
    score: float
    text: str
    id: str

    def to_dict(self) -> dict:
        return asdict(self)


def normalize_git_url(url: str) -> str:
    """`git@github.com:Org/Repo.git`, `https://u:p@github.com/Org/Repo/` -> `github.com/org/repo`."""
    u = url.strip().rstrip("/")
    u = re.sub(r"\.git$", "", u)
    u = re.sub(r"^[a-z][a-z0-9+.\-]*://", "", u, flags=re.I)
    u = re.sub(r"^[^@/]+@", "", u)
    u = re.sub(r"^([^/:]+):(?!\d+/)", r"\1/", u)  # scp-like host:path
    u = re.sub(r"^([^/:]+):\d+/", r"\1/", u)  # drop a port
    return u.lower()


class Retriever:
    """Retrieval over the index at `index_path` (default `$CODEMOAT_HOME/index.db`).

    Cheap to construct, safe to share between threads; a missing index simply yields no snippets.
    `groups` is always the caller's groups; see `codemoat.retrieve.acl` for the rule.
    """

    def __init__(self, index_path: Path | str | None = None):
        self.path = Path(index_path) if index_path is not None else default_path()
        self._store = SqliteIndex(self.path)
        self._lock = threading.Lock()
        self._repos: tuple[float, list[RepoInfo]] = (0.0, [])
        self._packages: dict[tuple[int, float | None], str | None] = {}

    # -- repositories ----------------------------------------------------------------------------
    def _all_repos(self) -> list[RepoInfo]:
        if not self.path.exists():
            return []
        with self._lock:
            at, repos = self._repos
            if time.monotonic() - at > REPO_CACHE_S:
                repos = self._store.repos()
                self._repos = (time.monotonic(), repos)
            return repos

    def readable_repos(self, groups: frozenset[str]) -> list[str]:
        """Names of the repositories a caller in `groups` may read."""
        return [r.name for r in self._all_repos() if can_read(r.groups, groups)]

    def repo_for(self, git_url: str | None, filepath: str | None) -> str | None:
        """The indexed repository a request's file belongs to: by the git remote recorded at index
        time, by repository name given as `git_url`, or by an absolute path under a repository's folder."""
        repos = self._all_repos()
        if git_url:
            want = normalize_git_url(git_url)
            for r in repos:
                if r.git_url and normalize_git_url(r.git_url) == want:
                    return r.name
            for r in repos:
                if r.name == git_url.strip():
                    return r.name
        if filepath and filepath.startswith("/"):
            best = None
            for r in repos:
                root = r.root.rstrip("/") + "/"
                if filepath.startswith(root) and (best is None or len(root) > len(best.root)):
                    best = r
            if best is not None:
                return best.name
        return None

    def _package(self, info: RepoInfo) -> str | None:
        """The import name of a repository whose root folder is itself a package (it holds an
        `__init__.py`, as an installed package does): the folder's name."""
        key = (info.id, info.updated)
        if key not in self._packages:
            is_pkg = self._store.file_id(info.id, "__init__.py") is not None
            self._packages[key] = Path(info.root).name if is_pkg else None
        return self._packages[key]

    def _readable(self, names: Sequence[str], groups: frozenset[str]) -> dict[int, RepoInfo]:
        want = set(names)
        return {r.id: r for r in self._all_repos() if r.name in want and can_read(r.groups, groups)}

    # -- completion ------------------------------------------------------------------------------
    def snippets_for_completion(
        self,
        *,
        groups: frozenset[str],
        repo: str,
        path: str,
        prefix: str,
        suffix: str,
        k: int = 5,
        budget_tokens: int = 512,
        count_tokens: Callable[[str], int] = approx_tokens,
        cursor_line: int | None = None,
    ) -> list[Snippet]:
        """Snippets for a completion at the end of `prefix` in `repo`/`path`, best first.

        `path` is relative to the repository (an absolute path under its folder is accepted).
        `cursor_line` (1-based) defaults to the line count of `prefix`, i.e. the prefix is assumed to
        start at the top of the file. Chunks of this file that overlap the lines the request carries
        are left out: they are in the prompt already.
        """
        repos = self._readable([repo], groups)
        if not repos or k <= 0 or budget_tokens <= 0:
            return []
        info = next(iter(repos.values()))
        rel = self._relative(info, path)
        q = completion_query(prefix, suffix, rel)
        package = self._package(info)
        if package:
            q.relative_to_package(package)
        line = cursor_line if cursor_line is not None else prefix.count("\n") + 1
        lo = line - prefix.count("\n")
        hi = line + suffix.count("\n")
        carried = {ln.strip() for ln in (prefix + "\n" + suffix).split("\n") if len(ln.strip()) > 3}

        def excluded(c: ChunkRow) -> bool:
            if c.path != rel:
                return False
            if c.start_line <= hi and c.end_line >= lo:
                return True
            body = [ln.strip() for ln in c.text.split("\n") if len(ln.strip()) > 3][:4]
            return bool(body) and all(b in carried for b in body)

        ranked = self._rank(q, repos, excluded, rel)
        return self._fit(ranked, repos, groups, k, budget_tokens, count_tokens)

    # -- chat ------------------------------------------------------------------------------------
    def snippets_for_chat(
        self,
        *,
        groups: frozenset[str],
        repos: list[str],
        query: str,
        k: int = 8,
        budget_tokens: int = 1500,
        count_tokens: Callable[[str], int] = approx_tokens,
    ) -> list[Snippet]:
        """Snippets answering a question about `repos` (an empty list means every readable repository)."""
        names = repos or self.readable_repos(groups)
        readable = self._readable(names, groups)
        if not readable or k <= 0 or budget_tokens <= 0:
            return []
        ranked = self._rank(chat_query(query), readable, lambda c: False, None)
        return self._fit(ranked, readable, groups, k, budget_tokens, count_tokens)

    def mentioned_repos(self, groups: frozenset[str], text: str) -> list[str]:
        """Readable repositories named as `@name` in a chat message."""
        readable = set(self.readable_repos(groups))
        return [m for m in dict.fromkeys(re.findall(r"(?<![\w@])@([\w.\-]+)", text)) if m in readable]

    # -- ranking ---------------------------------------------------------------------------------
    def _relative(self, info: RepoInfo, path: str) -> str:
        if path.startswith("/"):
            root = info.root.rstrip("/") + "/"
            if path.startswith(root):
                path = path[len(root) :]
        return posixpath.normpath(path.replace("\\", "/")).lstrip("./") if path else path

    def symbol_ranking(self, q: Query, repo_ids: Sequence[int], current: str | None) -> list[tuple[int, float]]:
        """(chunk id, score) from the symbol table, best first."""
        rows = self._store.lookup_symbols(q.weights, list(repo_ids), limit=2000)
        by_name: dict[str, int] = {}
        at_hint: set[str] = set()  # imported names defined in the module they are imported from
        for s in rows:
            by_name[s.name] = by_name.get(s.name, 0) + 1
            if s.name not in at_hint and any(_path_match(_stem(s.path), frag) for frag in q.hints.get(s.name, ())):
                at_hint.add(s.name)
        scores: dict[int, float] = {}
        near = _Fragments(q.path_hints)
        for s in rows:
            if s.path == current:
                continue
            w = q.weights.get(s.name, 0.0)
            stem = _stem(s.path)
            hint = 1.0
            for frag in q.hints.get(s.name, ()):
                if _path_match(stem, frag):
                    hint = 4.0
                    break
            else:
                if s.name in q.hints and s.name not in at_hint and "." not in s.qualname:
                    hint = 4.0  # imported from a module that re-exports it: this may well be it
                elif near.match(stem):
                    hint = 2.0
            owners = q.qualified.get(s.name)
            if owners and "." in s.qualname and s.qualname.rsplit(".", 2)[-2] in owners:
                hint *= 2.0
            kind = 0.5 if s.kind == "variable" else 1.0
            score = w * hint * kind * _fitness(q, s) / (1.0 + math.log(by_name[s.name]))
            scores[s.chunk_id] = scores.get(s.chunk_id, 0.0) + score
        # We know the next name is one of the owner's members: they rank above every other symbol candidate.
        members = self._members(q, repo_ids)
        base = 10.0 / (1.0 + math.log1p(len(members)))
        for s, reach in members:
            if s.path != current:
                scores[s.chunk_id] = scores.get(s.chunk_id, 0.0) + base * reach + q.member_weights.get(s.name, 0.0) * 5.0
        # Among the candidates, prefer those whose text resembles the code at the cursor.
        top = sorted(scores.items(), key=lambda kv: -kv[1])[: 4 * CANDIDATES]
        rel = self._bm25(q, repo_ids)
        best = max(rel.values(), default=0.0) or 1.0
        top = [(cid, sc * (SYMBOL_BM25_FLOOR + rel.get(cid, 0.0) / best)) for cid, sc in top]
        return sorted(top, key=lambda kv: -kv[1])[:CANDIDATES]

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

    def _bm25(self, q: Query, repo_ids: Sequence[int]) -> dict[int, float]:
        """BM25 scores of the best BM25_POOL chunks for the query, computed once per query."""
        key = (tuple(q.bm25_terms), tuple(repo_ids))
        if q.cache.get("key") != key:
            q.cache["key"] = key
            q.cache["hits"] = self._store.search(q.bm25_terms, list(repo_ids), BM25_POOL)
        return dict(q.cache["hits"])

    def bm25_ranking(self, q: Query, repo_ids: Sequence[int]) -> list[tuple[int, float]]:
        self._bm25(q, repo_ids)
        return q.cache["hits"][:CANDIDATES]

    def _rank(self, q: Query, repos: dict[int, RepoInfo], excluded: Callable[[ChunkRow], bool],
              current: str | None) -> list[tuple[ChunkRow, float]]:  # fmt: skip
        fused: dict[int, float] = {}
        for weight, ranking in (
            (W_SYMBOLS, self.symbol_ranking(q, list(repos), current)),
            (W_BM25, self.bm25_ranking(q, list(repos))),
        ):
            for rank, (cid, _s) in enumerate(ranking):
                fused[cid] = fused.get(cid, 0.0) + weight / (RRF_K + rank + 1)
        rows = self._store.chunks(fused)
        out: list[tuple[ChunkRow, float]] = []
        top = max(fused.values(), default=0.0)
        covered: set[int] = set()  # chunks whose signature an outline above already shows
        for i, (outline, ids) in enumerate(self._outlines(q, list(repos), current)):  # the next name is one of these
            out.append((outline, top + 1e-3 / (i + 1)))
            covered |= ids
        for row, score, ids in self._import_outlines(q, list(repos), current, fused, rows):
            out.append((row, score))
            covered |= ids
        for cid, score in sorted(fused.items(), key=lambda kv: -kv[1]):
            c = rows.get(cid)
            if c is None or c.repo_id not in repos or excluded(c):
                continue
            out.append((c, score * (COVERED if cid in covered else 1.0)))
        out.sort(key=lambda cs: -cs[1])
        return out

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

    def _fit(self, ranked: list[tuple[ChunkRow, float]], repos: dict[int, RepoInfo], groups: frozenset[str],
             k: int, budget: int, count: Callable[[str], int]) -> list[Snippet]:  # fmt: skip
        out: list[Snippet] = []
        seen_text: set[str] = set()
        spans: list[tuple[str, int, int, str]] = []
        left = budget
        for c, score in ranked:
            info = repos.get(c.repo_id)
            if info is None or not can_read(info.groups, groups):  # second check on the way out
                continue
            if c.text in seen_text or any(
                p == c.path and kind == c.kind and s <= c.start_line and c.end_line <= e for p, s, e, kind in spans
            ):
                continue
            text = fit_lines(c.path, c.text, left, count)
            if text is None:
                if left < 48:
                    break
                continue
            end = c.end_line if text == c.text else c.start_line + text.count("\n")
            seen_text.add(c.text)
            spans.append((c.path, c.start_line, c.end_line, c.kind))
            out.append(Snippet(info.name, c.path, c.start_line, min(end, c.end_line), round(score, 5), text,
                               f"{info.name}:{c.path}:{c.start_line}-{c.end_line}"))  # fmt: skip
            left -= count(c.path + "\n" + text)
            if len(out) >= k or left <= 0:
                break
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
                hit = stem in self.frags or stem in self.tails or any("/".join(parts[i:]) in self.frags for i in range(1, len(parts)))
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
