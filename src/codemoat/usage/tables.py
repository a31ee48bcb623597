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

# The daily roll-up (migration u002_rollup; written in the same transaction as each row above, see
# rollup.py): one row per UTC day x user x language x protocol, sums only.
daily = sa.Table(
    "usage_daily",
    meta,
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("user", sa.String(128), primary_key=True),
    sa.Column("language", sa.String(32), primary_key=True),
    sa.Column("protocol", sa.String(16), primary_key=True),
    sa.Column("completions", sa.BigInteger),  # rows of kind "completion"
    sa.Column("chats", sa.BigInteger),
    sa.Column("c_prompt", sa.BigInteger),  # prompt / output tokens of completions, then of chats
    sa.Column("c_output", sa.BigInteger),
    sa.Column("h_prompt", sa.BigInteger),
    sa.Column("h_output", sa.BigInteger),
    sa.Column("views", sa.BigInteger),  # matched events only (named a completion this user received)
    sa.Column("selects", sa.BigInteger),
    sa.Column("dismisses", sa.BigInteger),
    sa.Column("accepted_chars", sa.BigInteger),
    sa.Column("accepted_lines", sa.BigInteger),
    sa.Column("unmatched", sa.BigInteger),  # events naming no completion of this user
    sa.Column("events", sa.BigInteger),  # every event, any type, matched or not (activity)
)
# the same sums per day x language x protocol (unfiltered reports: tens of rows a day, not thousands)
daily_lang = sa.Table(
    "usage_daily_lang",
    meta,
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("language", sa.String(32), primary_key=True),
    sa.Column("protocol", sa.String(16), primary_key=True),
    *(sa.Column(c.name, sa.BigInteger) for c in daily.c if c.name not in ("day", "user", "language", "protocol")),
)
# and per day x user (distinct users: totals, per day, active and engaged windows)
daily_users = sa.Table(
    "usage_daily_users",
    meta,
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("user", sa.String(128), primary_key=True),
    *(sa.Column(c.name, sa.BigInteger) for c in daily.c if c.name not in ("day", "user", "language", "protocol")),
)
# completion latency (kind "completion") per day in buckets: 1 ms below 1 s, 10 ms below 10 s, then 100 ms
latency_daily = sa.Table(
    "usage_latency_daily",
    meta,
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("bucket", sa.Integer, primary_key=True),
    sa.Column("n", sa.BigInteger),
)
# completions and chats per hour (epoch hours): the cost case's peak-hour factor
hourly = sa.Table(
    "usage_hourly",
    meta,
    sa.Column("hour", sa.Integer, primary_key=True),
    sa.Column("n", sa.BigInteger),
)
