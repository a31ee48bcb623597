"""vault: the key server's outstanding challenge nonces, shared by every key server process

Revision ID: v004_lease_nonces
Revises: v003_tpm_keys
"""

import sqlalchemy as sa
from alembic import op

revision = "v004_lease_nonces"
down_revision = "v003_tpm_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vault_lease_nonces",
        sa.Column("nonce", sa.String(64), primary_key=True),  # base64 of 32 random bytes
        sa.Column("license_id", sa.String(40), nullable=False),
        sa.Column("expires", sa.Float, nullable=False),  # wall-clock seconds: processes share no monotonic clock
    )
    op.create_index("ix_vault_lease_nonces_expires", "vault_lease_nonces", ["expires"])


def downgrade() -> None:
    op.drop_index("ix_vault_lease_nonces_expires", "vault_lease_nonces")
    op.drop_table("vault_lease_nonces")
