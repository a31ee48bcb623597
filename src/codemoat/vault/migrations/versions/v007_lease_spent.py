"""vault: spent challenge nonces (the nonces themselves are stateless: an HMAC under the key server's key)

The outstanding-nonce table `vault_lease_nonces` is no longer written; it is left in place so a key server
of the previous release, still running during a rolling upgrade, keeps working, and can be dropped later.

Revision ID: v007_lease_spent
Revises: v006_revocations
"""

import sqlalchemy as sa
from alembic import op

revision = "v007_lease_spent"
down_revision = "v006_revocations"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vault_lease_spent",
        sa.Column("nonce", sa.String(64), primary_key=True),  # base64 of 48 bytes (`nonces.NONCE_CHARS`)
        sa.Column("expires", sa.Float, nullable=False),  # wall-clock seconds: kept until then, swept after
    )
    op.create_index("ix_vault_lease_spent_expires", "vault_lease_spent", ["expires"])


def downgrade() -> None:
    op.drop_index("ix_vault_lease_spent_expires", "vault_lease_spent")
    op.drop_table("vault_lease_spent")
