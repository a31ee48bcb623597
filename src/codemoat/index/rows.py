"""What retrieval reads from an index: the rows it gets back and the interface a backend implements
(`store.SqliteIndex` with SQLite FTS5; a search backend such as PostgreSQL full-text search could later)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RepoInfo:
    id: int
    name: str
    root: str
    git_url: str | None
    groups: tuple[str, ...]
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    created: float
    updated: float | None
    files: int = 0
    chunks: int = 0
    symbols: int = 0
    last_report: dict | None = None  # the last update's counts: indexed, removed, skipped, refused (path -> why)
    root_id: tuple[int, int] | None = None  # the folder's (device, inode) at `index add`; None: not known yet


@dataclass(frozen=True)
class ChunkRow:
    id: int
    repo_id: int
    path: str
    start_line: int
    end_line: int
    kind: str
    name: str
    text: str


@dataclass(frozen=True)
class SymbolRow:
    name: str
    qualname: str
    kind: str
    signature: str
    repo_id: int
    path: str
    chunk_id: int
    start_line: int
    end_line: int
    doc: str = ""


class IndexReader(Protocol):
    """What retrieval asks of an index backend."""

    def repos(self) -> list[RepoInfo]: ...
    def doc_freq(self, query_terms: Iterable[str]) -> dict[str, int]: ...
    def search(self, query_terms: Sequence[str], repo_ids: Sequence[int], limit: int) -> list[tuple[int, float]]: ...
    def score_chunks(self, query_terms: Sequence[str], chunk_ids: Sequence[int]) -> dict[int, float]: ...

    def lookup_symbols(self, names: Iterable[str], repo_ids: Sequence[int], limit: int = 400) -> list[SymbolRow]: ...
    def chunks(self, ids: Iterable[int]) -> dict[int, ChunkRow]: ...
