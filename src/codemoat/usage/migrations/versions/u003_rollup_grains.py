"""usage: the roll-up's sums also per day x language x protocol and per day x user (unfiltered
reports and distinct users read these small tables); the roll-up rebuilt from the rows

Revision ID: u003_rollup_grains
Revises: u002_rollup
"""

import sqlalchemy as sa
from alembic import op

revision = "u003_rollup_grains"
down_revision = "u002_rollup"
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
        "usage_daily_lang",
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("language", sa.String(32), primary_key=True),
        sa.Column("protocol", sa.String(16), primary_key=True),
        *(sa.Column(f, sa.BigInteger, nullable=False, server_default="0") for f in FACTS),
    )
    op.create_table(
        "usage_daily_users",
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("user", sa.String(128), primary_key=True),
        *(sa.Column(f, sa.BigInteger, nullable=False, server_default="0") for f in FACTS),
    )
    from codemoat.usage.rollup import rebuild

    rebuild(op.get_bind())


def downgrade() -> None:
    op.drop_table("usage_daily_users")
    op.drop_table("usage_daily_lang")
