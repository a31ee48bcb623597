"""The index database's tables (SQLite, FTS5 for BM25) and the upgrade of an index written by an older codemoat."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 4  # 3: repos.last_report; 4: repos.root_dev, root_ino
SCHEMA = """
CREATE TABLE IF NOT EXISTS repos(
  id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, root TEXT NOT NULL, git_url TEXT,
  include TEXT NOT NULL DEFAULT '[]', exclude TEXT NOT NULL DEFAULT '[]',
  created REAL NOT NULL, updated REAL, last_report TEXT, root_dev INTEGER, root_ino INTEGER);
CREATE TABLE IF NOT EXISTS repo_groups(
  repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE, grp TEXT NOT NULL,
  PRIMARY KEY(repo_id, grp));
CREATE TABLE IF NOT EXISTS files(
  id INTEGER PRIMARY KEY, repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
  path TEXT NOT NULL, hash TEXT NOT NULL, lines INTEGER NOT NULL, UNIQUE(repo_id, path));
CREATE TABLE IF NOT EXISTS chunks(
  id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL, repo_id INTEGER NOT NULL,
  start_line INTEGER NOT NULL, end_line INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
  text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_file ON chunks(file_id);
CREATE TABLE IF NOT EXISTS symbols(
  id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL, repo_id INTEGER NOT NULL, chunk_id INTEGER NOT NULL,
  name TEXT NOT NULL, qualname TEXT NOT NULL, kind TEXT NOT NULL, signature TEXT NOT NULL,
  doc TEXT NOT NULL, start_line INTEGER NOT NULL, end_line INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS symbols_name ON symbols(name, repo_id);
CREATE INDEX IF NOT EXISTS symbols_file ON symbols(file_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(terms, tokenize="unicode61 tokenchars '_'");
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_vocab USING fts5vocab(chunks_fts, 'row');
"""


def upgrade(conn: sqlite3.Connection) -> None:
    """Bring an index written by an older codemoat to SCHEMA_VERSION (tables are created if missing)."""
    if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    cols = {r[1] for r in conn.execute("PRAGMA table_info(repos)")}
    if cols and "last_report" not in cols:
        conn.execute("ALTER TABLE repos ADD COLUMN last_report TEXT")
    if cols and "root_dev" not in cols:  # learnt at each repository's next update (index.update)
        conn.execute("ALTER TABLE repos ADD COLUMN root_dev INTEGER")
        conn.execute("ALTER TABLE repos ADD COLUMN root_ino INTEGER")
    conn.executescript(SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};")
