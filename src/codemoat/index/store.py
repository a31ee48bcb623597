"""Index storage: repositories and their groups, files with content hashes, chunks, symbols, BM25.

The interface retrieval needs is `rows.IndexReader` (a search backend could implement it later,
e.g. PostgreSQL full-text search); `SqliteIndex` implements it with SQLite FTS5 (the tables:
`schema.py`), whose `bm25()` is Okapi BM25 with k1 = 1.2, b = 0.75
(https://sqlite.org/fts5.html#the_bm25_function).

Usage:
    store = SqliteIndex(path)                   # $CODEMOAT_HOME/index.db by default
    with store.transaction():                   # all or nothing: an interrupted run changes nothing
        store.replace_file(repo_id, "a.py", digest, chunks, symbols)
    store.search(["parse", "header"], [repo_id], limit=50)

The database runs in WAL mode, so readers (the server) keep seeing the previous index until an
update commits.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import CodemoatError, NotFound
from ..paths import NotSQLite, private_sqlite
from .chunk import Chunk, Symbol
from .rows import ChunkRow, RepoInfo, SymbolRow
from .schema import SCHEMA, upgrade
from .snapshots import SnapshotDir
from .terms import path_terms, terms

MAX_DF_FRACTION = 0.05  # query terms in more chunks than this carry little BM25 weight and cost the most
MAX_QUERY_TERMS = 24


def default_path() -> Path:
    """`CODEMOAT_INDEX_PATH` (an index shared by replicas on one volume), else `$CODEMOAT_HOME/index.db`."""
    import os

    from ..paths import home

    shared = os.environ.get("CODEMOAT_INDEX_PATH")
    return Path(shared).expanduser() if shared else home() / "index.db"


def repo_term(repo_id: int) -> str:
    """The FTS5 term every chunk of a repository carries, so a search is restricted inside the index."""
    return f"__r{repo_id}"


def _quote(term: str) -> str:
    return '"' + term.replace('"', '""') + '"'


_NOT_AN_INDEX = "is not a codemoat index, or it is corrupted"
_LEFT = "it was left as it is (index.path names the index file)"


class SqliteIndex:
    """The index in one SQLite file (FTS5 for BM25, plain tables for symbols and hashes). Thread-safe:
    each thread gets its own connection."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else default_path()
        self._local = threading.local()
        self._next_chunk = 0
        # a directory: immutable snapshots behind a pointer, for replicas sharing a volume (`index.snapshots`)
        self._snap = SnapshotDir(self.path) if self.path.is_dir() else None

    # -- connections -----------------------------------------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        if self._snap is not None:
            return getattr(self._local, "write", None) or self._snapshot_reader()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:  # 0600 before SQLite opens it; some other file named by index.path is refused, its mode untouched
                private_sqlite(self.path)
            except NotSQLite:
                raise CodemoatError(f"{self.path} {_NOT_AN_INDEX} (not a SQLite file); {_LEFT}") from None
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
                upgrade(conn)
            except sqlite3.DatabaseError as e:  # a damaged index: said so, and left as it is
                conn.close()
                if "not a database" not in str(e) and "malformed" not in str(e):
                    raise
                raise CodemoatError(f"{self.path} {_NOT_AN_INDEX} (SQLite: {e}); {_LEFT}") from None
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _snapshot_reader(self) -> sqlite3.Connection:
        """This thread's connection to the snapshot that was current when it last looked (`refresh`)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cur = self._snap.current()  # type: ignore[union-attr]
            if cur is None:  # nothing published yet: an empty index
                conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
                conn.executescript(SCHEMA)
            else:
                conn = SnapshotDir.open_reader(cur)
            self._local.conn, self._local.pointer = conn, cur.name if cur else None
        return conn

    def data_version(self) -> int:
        """A number that changes whenever another connection commits to the index (SQLite's `PRAGMA
        data_version`): compare it only with one read before on the same thread (its connection)."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def refresh(self) -> bool:
        """At a request's start: move to a newly published snapshot (one small read); True when it moved."""
        if self._snap is None or getattr(self._local, "conn", None) is None:
            return False
        if self._snap.pointer() == getattr(self._local, "pointer", None):
            return False
        self.close()
        return True

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction: committed when the block ends, rolled back on any exception
        (Ctrl-C included); a killed process leaves nothing behind either (WAL; or, for a snapshot
        directory, the next snapshot is published only once complete)."""
        if self._snap is not None:
            with self._snapshot_transaction():
                yield
            return
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            self._next_chunk = (db.execute("SELECT max(id) FROM chunks").fetchone()[0] or 0) + 1
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextmanager
    def _snapshot_transaction(self) -> Iterator[None]:
        building = self._snap.begin()  # type: ignore[union-attr]
        conn = None
        try:
            conn = building.connect()
            upgrade(conn)
            self._local.write = conn
            conn.execute("BEGIN IMMEDIATE")
            self._next_chunk = (conn.execute("SELECT max(id) FROM chunks").fetchone()[0] or 0) + 1
            yield
            conn.execute("COMMIT")
            conn.close()
        except BaseException:
            self._local.write = None
            if conn is not None:
                conn.close()
            building.abandon()
            raise
        self._local.write = None
        building.publish()
        self.close()  # this thread reads what it just wrote from now on

    # -- repositories ----------------------------------------------------------------------------
    def add_repo(self, name: str, root: str, groups: Sequence[str], git_url: str | None,
                 include: Sequence[str] = (), exclude: Sequence[str] = (),
                 root_id: tuple[int, int] | None = None) -> int:  # fmt: skip
        db = self.db
        if db.execute("SELECT 1 FROM repos WHERE name=?", (name,)).fetchone():
            raise CodemoatError(f"repository {name!r} is already indexed (use `codemoat index update {name}`)")
        dev, ino = root_id or (None, None)
        cur = db.execute(
            "INSERT INTO repos(name, root, git_url, include, exclude, created, root_dev, root_ino) VALUES (?,?,?,?,?,?,?,?)",
            (name, root, git_url, json.dumps(list(include)), json.dumps(list(exclude)), time.time(), dev, ino),
        )
        rid = int(cur.lastrowid or 0)
        db.executemany("INSERT INTO repo_groups VALUES (?,?)", [(rid, g) for g in sorted(set(groups))])
        return rid

    def set_root_id(self, rid: int, root_id: tuple[int, int]) -> None:
        """Record repository `rid`'s folder (device, inode): one indexed before schema 4 (inside a transaction)."""
        self.db.execute("UPDATE repos SET root_dev=?, root_ino=? WHERE id=?", (*root_id, rid))

    def set_groups(self, name: str, groups: Sequence[str]) -> None:
        rid = self.repo(name).id
        with self.transaction():
            self.db.execute("DELETE FROM repo_groups WHERE repo_id=?", (rid,))
            self.db.executemany("INSERT INTO repo_groups VALUES (?,?)", [(rid, g) for g in sorted(set(groups))])

    def remove_repo(self, name: str) -> None:
        rid = self.repo(name).id
        with self.transaction():
            self.delete_repo_rows(rid)

    def delete_repo_rows(self, rid: int) -> None:
        """Everything indexed from repository `rid`, and the repository itself (inside a transaction)."""
        db = self.db
        db.execute("DELETE FROM chunks_fts WHERE rowid IN (SELECT id FROM chunks WHERE repo_id=?)", (rid,))
        for table in ("chunks", "symbols", "files", "repo_groups"):
            db.execute(f"DELETE FROM {table} WHERE repo_id=?", (rid,))
        db.execute("DELETE FROM repos WHERE id=?", (rid,))

    def repos(self, counts: bool = False) -> list[RepoInfo]:
        db = self.db
        groups: dict[int, list[str]] = {}
        for rid, g in db.execute("SELECT repo_id, grp FROM repo_groups ORDER BY grp"):
            groups.setdefault(rid, []).append(g)
        stats: dict[int, tuple[int, int, int]] = {}
        if counts:
            for rid, f in db.execute("SELECT repo_id, count(*) FROM files GROUP BY repo_id"):
                stats[rid] = (f, 0, 0)
            for rid, c in db.execute("SELECT repo_id, count(*) FROM chunks GROUP BY repo_id"):
                stats[rid] = (stats.get(rid, (0, 0, 0))[0], c, 0)
            for rid, s in db.execute("SELECT repo_id, count(*) FROM symbols GROUP BY repo_id"):
                f, c, _ = stats.get(rid, (0, 0, 0))
                stats[rid] = (f, c, s)
        out = []
        # a snapshot published before schema 3 or 4 (read-only here) lacks their columns
        cols = {r[1] for r in db.execute("PRAGMA table_info(repos)")}
        report = "last_report" if "last_report" in cols else "NULL"
        ident = "root_dev, root_ino" if "root_dev" in cols else "NULL, NULL"
        for rid, name, root, url, inc, exc, created, updated, rep, dev, ino in db.execute(
            f"SELECT id, name, root, git_url, include, exclude, created, updated, {report}, {ident} FROM repos ORDER BY name"
        ):
            f, c, s = stats.get(rid, (0, 0, 0))
            out.append(RepoInfo(rid, name, root, url, tuple(groups.get(rid, ())), tuple(json.loads(inc)),
                                tuple(json.loads(exc)), created, updated, f, c, s,
                                json.loads(rep) if rep else None,
                                (dev, ino) if dev is not None and ino is not None else None))  # fmt: skip
        return out

    def repo(self, name: str) -> RepoInfo:
        for r in self.repos():
            if r.name == name:
                return r
        raise NotFound(f"no indexed repository named {name!r} (see `codemoat index list`)")

    # -- files -----------------------------------------------------------------------------------
    def file_hashes(self, repo_id: int) -> dict[str, tuple[int, str]]:
        return {p: (fid, h) for fid, p, h in self.db.execute("SELECT id, path, hash FROM files WHERE repo_id=?", (repo_id,))}

    def delete_file(self, file_id: int) -> None:
        db = self.db
        db.execute("DELETE FROM chunks_fts WHERE rowid IN (SELECT id FROM chunks WHERE file_id=?)", (file_id,))
        db.execute("DELETE FROM chunks WHERE file_id=?", (file_id,))
        db.execute("DELETE FROM symbols WHERE file_id=?", (file_id,))
        db.execute("DELETE FROM files WHERE id=?", (file_id,))

    def replace_file(self, repo_id: int, path: str, digest: str, lines: int,
                     chunks: Sequence[Chunk], symbols: Sequence[Symbol], old_file_id: int | None = None) -> None:  # fmt: skip
        """Store one file's chunks and symbols in place of its previous version (inside a transaction)."""
        db = self.db
        if old_file_id is not None:
            self.delete_file(old_file_id)
        fid = db.execute(
            "INSERT INTO files(repo_id, path, hash, lines) VALUES (?,?,?,?)", (repo_id, path, digest, lines)
        ).lastrowid
        first = self._next_chunk
        self._next_chunk += len(chunks)
        extra = " ".join([repo_term(repo_id), *path_terms(path)])
        db.executemany(
            "INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?)",
            [(first + i, fid, repo_id, c.start, c.end, c.kind, c.name, c.text) for i, c in enumerate(chunks)],
        )
        db.executemany(
            "INSERT INTO chunks_fts(rowid, terms) VALUES (?,?)",
            [(first + i, extra + " " + " ".join(terms(c.text))) for i, c in enumerate(chunks)],
        )
        db.executemany(
            "INSERT INTO symbols(file_id, repo_id, chunk_id, name, qualname, kind, signature, doc, start_line, end_line)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)",
            [(fid, repo_id, first + s.chunk, s.name, s.qualname, s.kind, s.signature, s.doc, s.start, s.end) for s in symbols],
        )

    def touch_repo(self, repo_id: int, report: dict | None = None) -> None:
        """The repository was updated now; `report` (its skipped and refused files) is what the console shows."""
        self.db.execute(
            "UPDATE repos SET updated=?, last_report=? WHERE id=?",
            (time.time(), json.dumps(report) if report is not None else None, repo_id),
        )

    # -- reading ---------------------------------------------------------------------------------
    def prune_terms(self, query_terms: Sequence[str]) -> list[str]:
        """The rarest MAX_QUERY_TERMS of `query_terms` that occur at all and in at most MAX_DF_FRACTION of
        chunks: common terms add almost nothing to BM25 (low IDF) but make FTS5 walk long posting lists."""
        terms_ = list(dict.fromkeys(query_terms))
        if not terms_:
            return []
        db = self.db
        df = dict(db.execute(f"SELECT term, doc FROM chunks_vocab WHERE term IN ({','.join('?' * len(terms_))})", terms_))
        now = time.monotonic()
        if now - getattr(self._local, "n_at", -1e9) > 10:
            self._local.n = db.execute("SELECT max(id) FROM chunks").fetchone()[0] or 0
            self._local.n_at = now
        cap = max(50, MAX_DF_FRACTION * self._local.n)
        kept = sorted((t for t in terms_ if 0 < df.get(t, 0) <= cap), key=lambda t: df[t])
        return kept[:MAX_QUERY_TERMS]

    def doc_freq(self, query_terms: Iterable[str]) -> dict[str, int]:
        """How many chunks hold each term (terms in no chunk are left out)."""
        terms_ = list(dict.fromkeys(query_terms))
        if not terms_:
            return {}
        q = f"SELECT term, doc FROM chunks_vocab WHERE term IN ({','.join('?' * len(terms_))})"
        return dict(self.db.execute(q, terms_))

    def search(self, query_terms: Sequence[str], repo_ids: Sequence[int], limit: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score, higher is better) of the best chunks matching any of `query_terms`."""
        query_terms = self.prune_terms(query_terms)
        if not query_terms or not repo_ids:
            return []
        scope = " OR ".join(_quote(repo_term(r)) for r in repo_ids)
        match = f"({scope}) AND ({' OR '.join(_quote(t) for t in query_terms)})"
        # The scope term narrows the search; the chunk's own repository decides: a file's text can hold
        # `__r7` too, and another repository's chunks would then fill the LIMIT in front of repository 7's.
        rows = self.db.execute(
            "SELECT f.rowid, bm25(chunks_fts) FROM chunks_fts f JOIN chunks c ON c.id = f.rowid"
            f" WHERE chunks_fts MATCH ? AND c.repo_id IN ({','.join('?' * len(repo_ids))}) ORDER BY rank LIMIT ?",
            (match, *repo_ids, limit),
        ).fetchall()
        return [(rid, -score) for rid, score in rows]

    def score_chunks(self, query_terms: Sequence[str], chunk_ids: Sequence[int]) -> dict[int, float]:
        """BM25 score (higher is better) of each of `chunk_ids` that matches any of `query_terms`."""
        query_terms = self.prune_terms(query_terms)
        if not query_terms or not chunk_ids:
            return {}
        match = " OR ".join(_quote(t) for t in query_terms)
        q = f"SELECT rowid, bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? AND rowid IN ({','.join('?' * len(chunk_ids))})"
        return {rid: -score for rid, score in self.db.execute(q, (match, *chunk_ids))}

    def lookup_symbols(self, names: Iterable[str], repo_ids: Sequence[int], limit: int = 400) -> list[SymbolRow]:
        names = list(dict.fromkeys(names))
        if not names or not repo_ids:
            return []
        q = (
            "SELECT s.name, s.qualname, s.kind, s.signature, s.repo_id, f.path, s.chunk_id, s.start_line, s.end_line, s.doc"
            " FROM symbols s JOIN files f ON f.id = s.file_id"
            f" WHERE s.name IN ({','.join('?' * len(names))}) AND s.repo_id IN ({','.join('?' * len(repo_ids))})"
            " LIMIT ?"
        )
        return [SymbolRow(*r) for r in self.db.execute(q, (*names, *repo_ids, limit))]

    def files_matching(self, stem: str, repo_ids: Sequence[int]) -> list[tuple[int, str]]:
        """(file id, path) of files whose path contains `stem` (the caller filters precisely)."""
        if not stem or not repo_ids:
            return []
        q = f"SELECT id, path FROM files WHERE repo_id IN ({','.join('?' * len(repo_ids))}) AND path LIKE ? LIMIT 200"
        like = "%" + stem.replace("%", "").replace("_", "\\_") + "%"
        return list(self.db.execute(q.replace("LIKE ?", "LIKE ? ESCAPE '\\'"), (*repo_ids, like)))

    def symbols_in(self, file_ids: Sequence[int], start: int = 0, end: int = 1 << 30) -> list[SymbolRow]:
        """Symbols of these files whose definition starts within lines start..end."""
        if not file_ids:
            return []
        q = (
            "SELECT s.name, s.qualname, s.kind, s.signature, s.repo_id, f.path, s.chunk_id, s.start_line, s.end_line, s.doc"
            " FROM symbols s JOIN files f ON f.id = s.file_id"
            f" WHERE s.file_id IN ({','.join('?' * len(file_ids))}) AND s.start_line BETWEEN ? AND ? LIMIT 2000"
        )
        return [SymbolRow(*r) for r in self.db.execute(q, (*file_ids, start, end))]

    def file_id(self, repo_id: int, path: str) -> int | None:
        row = self.db.execute("SELECT id FROM files WHERE repo_id=? AND path=?", (repo_id, path)).fetchone()
        return row[0] if row else None

    def chunks(self, ids: Iterable[int]) -> dict[int, ChunkRow]:
        ids = list(ids)
        if not ids:
            return {}
        q = (
            "SELECT c.id, c.repo_id, f.path, c.start_line, c.end_line, c.kind, c.name, c.text"
            f" FROM chunks c JOIN files f ON f.id = c.file_id WHERE c.id IN ({','.join('?' * len(ids))})"
        )
        return {r[0]: ChunkRow(*r) for r in self.db.execute(q, ids)}

    def file_chunks(self, repo_id: int, path: str) -> list[ChunkRow]:
        q = (
            "SELECT c.id, c.repo_id, f.path, c.start_line, c.end_line, c.kind, c.name, c.text"
            " FROM chunks c JOIN files f ON f.id = c.file_id WHERE f.repo_id=? AND f.path=? ORDER BY c.start_line"
        )
        return [ChunkRow(*r) for r in self.db.execute(q, (repo_id, path))]
