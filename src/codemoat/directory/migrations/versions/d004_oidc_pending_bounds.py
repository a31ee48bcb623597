"""directory: unfinished sign-ins bounded per client address, pruned and counted through indexes

Revision ID: d004_oidc_pending_bounds
Revises: d003_signin_binding
"""

import sqlalchemy as sa
from alembic import op

revision = "d004_oidc_pending_bounds"
down_revision = "d003_signin_binding"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("oidc_pending") as b:
        b.add_column(sa.Column("client", sa.String(64), nullable=True))  # the address that started it
    op.create_index("ix_oidc_pending_created_at", "oidc_pending", ["created_at"])  # expiry: a range, not a scan
    op.create_index("ix_oidc_pending_client", "oidc_pending", ["client"])  # the per-address count


def downgrade() -> None:
    op.drop_index("ix_oidc_pending_client", "oidc_pending")
    op.drop_index("ix_oidc_pending_created_at", "oidc_pending")
    with op.batch_alter_table("oidc_pending") as b:
        b.drop_column("client")
