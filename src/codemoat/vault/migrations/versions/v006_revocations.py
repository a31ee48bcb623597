"""vault: the vendor's revocations, published to offline machines as numbered, signed CRLs

Revision ID: v006_revocations
Revises: v005_tpm_unsafe_clock
"""

import sqlalchemy as sa
from alembic import op

revision = "v006_revocations"
down_revision = "v005_tpm_unsafe_clock"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vault_revocations",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),  # the CRL number is the highest
        sa.Column("kind", sa.String(16), nullable=False),  # "license" or "machine"
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("revoked_at", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("vault_revocations")
