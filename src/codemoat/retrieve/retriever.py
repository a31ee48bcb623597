"""Cross-file context for completions and chat, filtered by the caller's groups.

For a completion: the identifiers in use are looked up in the symbol table, the last lines are
searched with BM25 over the chunks, and the two rankings are fused by weighted reciprocal rank
(Cormack et al. 2009, "Reciprocal Rank Fusion outperforms Condorcet and individual rank learning
methods"; k = 60 there, a smaller k here because only the top few matter). Symbol candidates are
weighed by how likely the next name is theirs: imported and not yet used, or used in the last lines;
named on the cursor's line (`request = ` ~ `Request`); of the kind the syntax there expects (an
exception class after `raise`, a predicate after `if`).

Outlines come first when the cursor follows `owner.` (`outlines.py`: a module's or a class's
members, likeliest first), and each repository file this file imports two or more names from
gets one too.

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
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..index.store import ChunkRow, RepoInfo, SqliteIndex, default_path
from ..index.update import PACK_ROOT
from .acl import can_read
from .fit import approx_tokens, fit_lines
from .outlines import SYMBOL_BM25_FLOOR, Outlines, _Fragments, _fitness, _path_match, _stem
from .query import Query, chat_query, completion_query

RRF_K = 3
W_SYMBOLS = 1.0
W_BM25 = 0.8
CANDIDATES = 40  # per ranking
BM25_POOL = 300  # BM25 hits whose scores also rerank symbol candidates
COVERED = 0.5  # a chunk whose signature an outline above shows already: the outline took its place


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


class Retriever(Outlines):
    """Retrieval over the index at `index_path` (default `$CODEMOAT_HOME/index.db`).

    Cheap to construct, safe to share between threads; a missing index simply yields no snippets.
    `groups` is always the caller's groups; see `codemoat.retrieve.acl` for the rule.
    """

    def __init__(self, index_path: Path | str | None = None):
        self.path = Path(index_path) if index_path is not None else default_path()
        self._store = SqliteIndex(self.path)
        self._local = threading.local()  # this thread's repositories, and the index version they were read at
        self._packages: dict[tuple[int, float | None], str | None] = {}

    # -- repositories ----------------------------------------------------------------------------
    def _all_repos(self) -> list[RepoInfo]:
        """The indexed repositories with their groups, read again whenever the index changed since this
        thread last read them (a repository regrouped or removed: not one request later, not seconds)."""
        if self._store.refresh():  # a new index snapshot was published: this request reads it whole
            self._local.repos = None
        if not self.path.exists():
            return []
        version = self._store.data_version()  # SQLite's own counter: one cheap read, no table read
        got = getattr(self._local, "repos", None)
        if got is None or got[0] != version:
            got = self._local.repos = (version, self._store.repos())
        return got[1]

    def readable_repos(self, groups: frozenset[str]) -> list[str]:
        """Names of the repositories a caller in `groups` may read."""
        return [r.name for r in self._all_repos() if can_read(r.groups, groups)]

    def repo_for(self, git_url: str | None, filepath: str | None, among: Collection[str] | None = None) -> str | None:
        """The indexed repository a request's file belongs to: by the git remote recorded at index
        time, by repository name given as `git_url`, or by an absolute path under a repository's folder.
        `among`: only these repositories (the caller's readable ones): two indexed from one remote, each for
        its own groups, gave every caller the first by name, and a member of the other got no retrieval."""
        repos = self._all_repos() if among is None else [r for r in self._all_repos() if r.name in among]
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

    def _packs(self, groups: frozenset[str]) -> dict[int, RepoInfo]:
        """Knowledge packs (vendor documentation and source, `codemoat update apply`) readable by `groups`."""
        return {r.id: r for r in self._all_repos() if r.root.startswith(PACK_ROOT) and can_read(r.groups, groups)}

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
        repos.update(self._packs(groups))  # the vendor's knowledge packs this caller may read, like a dependency
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
            if c.path != rel or c.repo_id != info.id:
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
        # a sentence's full stop after the name is not part of it ("ask @payments.")
        names = (m.rstrip(".") for m in re.findall(r"(?<![\w@])@([\w.\-]+)", text))
        return [m for m in dict.fromkeys(names) if m in readable]

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
