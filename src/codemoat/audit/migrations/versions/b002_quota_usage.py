"""audit: generated tokens per key and UTC day, shared by every replica

Revision ID: b002_quota_usage
Revises: b001_audit
"""

import sqlalchemy as sa
from alembic import op

revision = "b002_quota_usage"
down_revision = "b001_audit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quota_usage",
        sa.Column("key", sa.String(160), primary_key=True),  # "user:NAME" or "token:ID"
        sa.Column("day", sa.Integer, primary_key=True),  # days since the epoch, UTC
        sa.Column("used", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("quota_usage")
