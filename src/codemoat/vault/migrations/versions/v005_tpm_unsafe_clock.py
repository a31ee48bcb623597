"""vault: the reset count at which a TPM's clock floor was last set by a quote with clockInfo.safe = NO

Revision ID: v005_tpm_unsafe_clock
Revises: v004_lease_nonces
"""

import sqlalchemy as sa
from alembic import op

revision = "v005_tpm_unsafe_clock"
down_revision = "v004_lease_nonces"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("vault_tpm_keys", sa.Column("unsafe_reset", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vault_tpm_keys") as b:
        b.drop_column("unsafe_reset")
