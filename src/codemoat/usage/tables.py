"""The usage tables (migration `usage/migrations/versions/u001_usage.py`)."""

from __future__ import annotations

import sqlalchemy as sa

meta = sa.MetaData()
completions = sa.Table(
    "usage_completions",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("completion_id", sa.String(64)),
    sa.Column("ts", sa.Float),
    sa.Column("day", sa.String(10)),
    sa.Column("user", sa.String(128)),
    sa.Column("kind", sa.String(16)),
    sa.Column("language", sa.String(32)),
    sa.Column("protocol", sa.String(16)),
    sa.Column("prompt_tokens", sa.Integer),
    sa.Column("completion_tokens", sa.Integer),
    sa.Column("latency_ms", sa.Float),
    sa.Column("retrieval", sa.Boolean),
    sa.Column("status", sa.Integer),
    sa.Column("chars", sa.Integer),
    sa.Column("lines", sa.Integer),
    sa.Column("first_line_chars", sa.Integer),
)
events = sa.Table(
    "usage_events",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float),
    sa.Column("day", sa.String(10)),
    sa.Column("user", sa.String(128)),
    sa.Column("type", sa.String(16)),
    sa.Column("select_kind", sa.String(16)),
    sa.Column("completion_id", sa.String(64)),
    sa.Column("choice_index", sa.Integer),
    sa.Column("protocol", sa.String(16)),
    sa.Column("matched", sa.Boolean),
    sa.Column("language", sa.String(32)),
    sa.Column("chars", sa.Integer),
    sa.Column("lines", sa.Integer),
)
# the accounts' membership table, read (never written) for per-group reports
memberships = sa.table("memberships", sa.column("user", sa.String), sa.column("group", sa.String))
