"""usage: each completion's facts and each editor event, for acceptance and activity reports

Revision ID: u001_usage
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "u001_usage"
down_revision = None
branch_labels = ("usage",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_completions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("completion_id", sa.String(64), nullable=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("day", sa.String(10), nullable=False),  # UTC, YYYY-MM-DD: groups by day the same way on every backend
        sa.Column("user", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),  # completion | chat
        sa.Column("language", sa.String(32), nullable=False),
        sa.Column("protocol", sa.String(16), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("retrieval", sa.Boolean, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("chars", sa.Integer, nullable=False),
        sa.Column("lines", sa.Integer, nullable=False),
        sa.Column("first_line_chars", sa.Integer, nullable=False),  # what a select_kind=line event accepts
    )
    # No index on ts or (user, ts): reports read most of their window, and walking an index to the
    # table row by row (SQLite even skip-scans (user, ts) after ANALYZE) is ~10x slower than scanning
    # the table (bench/console.py). The latency index covers the percentile query (kind, then latency
    # in order, ts read from the index itself); completion_id serves the events' lookups.
    op.create_index("ix_usage_completions_cid", "usage_completions", ["completion_id"])
    op.create_index("ix_usage_completions_latency", "usage_completions", ["kind", "latency_ms", "ts"])
    op.create_table(
        "usage_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("user", sa.String(128), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),  # view | select | dismiss | other
        sa.Column("select_kind", sa.String(16), nullable=True),
        sa.Column("completion_id", sa.String(64), nullable=True),
        sa.Column("choice_index", sa.Integer, nullable=False),
        sa.Column("protocol", sa.String(16), nullable=False),
        # copied from the completion the event names (same user), so aggregates need no join
        sa.Column("matched", sa.Boolean, nullable=False),
        sa.Column("language", sa.String(32), nullable=False),
        sa.Column("chars", sa.Integer, nullable=False),
        sa.Column("lines", sa.Integer, nullable=False),
    )
    op.create_index("ix_usage_events_key", "usage_events", ["completion_id", "choice_index", "type"])


def downgrade() -> None:
    op.drop_table("usage_events")
    op.drop_table("usage_completions")
