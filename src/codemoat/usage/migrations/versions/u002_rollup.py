"""usage: the daily roll-up (day x user x language x protocol), latency buckets per day, requests
per hour; an index on day for the partial first day (backfilled by u003)

Revision ID: u002_rollup
Revises: u001_usage
"""

import sqlalchemy as sa
from alembic import op

revision = "u002_rollup"
down_revision = "u001_usage"
branch_labels = None
depends_on = None

FACTS = (
    "completions",
    "chats",
    "c_prompt",
    "c_output",
    "h_prompt",
    "h_output",
    "views",
    "selects",
    "dismisses",
    "accepted_chars",
    "accepted_lines",
    "unmatched",
    "events",
)


def upgrade() -> None:
    op.create_table(
        "usage_daily",
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("user", sa.String(128), primary_key=True),
        sa.Column("language", sa.String(32), primary_key=True),
        sa.Column("protocol", sa.String(16), primary_key=True),
        *(sa.Column(f, sa.BigInteger, nullable=False, server_default="0") for f in FACTS),
    )
    op.create_table(
        "usage_latency_daily",
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("bucket", sa.Integer, primary_key=True),
        sa.Column("n", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "usage_hourly",
        sa.Column("hour", sa.Integer, primary_key=True),
        sa.Column("n", sa.BigInteger, nullable=False),
    )
    # reports read the raw rows of one day only (the part of the first day at or after `since`)
    op.create_index("ix_usage_completions_day", "usage_completions", ["day"])
    op.create_index("ix_usage_events_day", "usage_events", ["day"])
    # filled from the rows already there by u003 (rollup.rebuild fills every grain of the roll-up)


def downgrade() -> None:
    op.drop_index("ix_usage_events_day", "usage_events")
    op.drop_index("ix_usage_completions_day", "usage_completions")
    op.drop_table("usage_hourly")
    op.drop_table("usage_latency_daily")
    op.drop_table("usage_daily")
