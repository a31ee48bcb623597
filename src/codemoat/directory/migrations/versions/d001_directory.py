"""directory: which users the directory manages, and when it was last read

Revision ID: d001_directory
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "d001_directory"
down_revision = None
branch_labels = ("directory",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "directory_users",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("dn", sa.String(1024), nullable=False),
        sa.Column("groups", sa.Text, nullable=False),  # the codemoat groups last granted, comma-separated
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("synced_at", sa.Float, nullable=False),
    )
    op.create_table(
        "directory_state",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("last_success", sa.Float, nullable=True),  # the last sync that read the whole directory
        sa.Column("last_attempt", sa.Float, nullable=True),
        sa.Column("last_error", sa.String(512), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("directory_state")
    op.drop_table("directory_users")
