"""directory: unfinished device codes bounded per client address, counted through indexes

Revision ID: d005_device_pending_bounds
Revises: d004_oidc_pending_bounds
"""

import sqlalchemy as sa
from alembic import op

revision = "d005_device_pending_bounds"
down_revision = "d004_oidc_pending_bounds"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("device_pending") as b:
        b.add_column(sa.Column("client", sa.String(64), nullable=True))  # the address that started it
    op.create_index("ix_device_pending_expires_at", "device_pending", ["expires_at"])  # the live ones: a range
    op.create_index("ix_device_pending_client", "device_pending", ["client"])  # the per-address count


def downgrade() -> None:
    op.drop_index("ix_device_pending_client", "device_pending")
    op.drop_index("ix_device_pending_expires_at", "device_pending")
    with op.batch_alter_table("device_pending") as b:
        b.drop_column("client")
