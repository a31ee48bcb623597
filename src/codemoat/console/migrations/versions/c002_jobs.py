"""console: re-index jobs started from the console, shared by every replica and kept across restarts

Revision ID: c002_jobs
Revises: c001_console
"""

import sqlalchemy as sa
from alembic import op

revision = "c002_jobs"
down_revision = "c001_console"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("repo", sa.String(256), nullable=False),
        sa.Column("by", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),  # running | finished | failed
        sa.Column("done", sa.Integer, nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("started", sa.Float, nullable=False),
        sa.Column("finished", sa.Float, nullable=True),
        sa.Column("stats", sa.Text, nullable=True),  # JSON: the index update's numbers
        sa.Column("error", sa.Text, nullable=True),
        # the process running it: host, pid and a random id per process start (a restarted
        # container's server may have the same pid), and its last sign of life
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("instance", sa.String(32), nullable=False),
        sa.Column("heartbeat", sa.Float, nullable=False),
    )
    op.create_index("ix_console_jobs_state", "console_jobs", ["state"])


def downgrade() -> None:
    op.drop_table("console_jobs")
