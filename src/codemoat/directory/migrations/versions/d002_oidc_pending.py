"""directory: OpenID Connect sign-ins under way (state, nonce, PKCE verifier), shared by replicas

Revision ID: d002_oidc_pending
Revises: d001_directory
"""

import sqlalchemy as sa
from alembic import op

revision = "d002_oidc_pending"
down_revision = "d001_directory"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "oidc_pending",
        sa.Column("state", sa.String(64), primary_key=True),
        sa.Column("nonce", sa.String(64), nullable=False),
        sa.Column("verifier", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("oidc_pending")
