"""vault: each TPM attestation key, bound to its certified EK, and the highest TPM clock seen

Revision ID: v003_tpm_keys
Revises: v002_lease_instances
"""

import sqlalchemy as sa
from alembic import op

revision = "v003_tpm_keys"
down_revision = "v002_lease_instances"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vault_tpm_keys",
        sa.Column("ak_id", sa.String(64), primary_key=True),  # SHA-256 of the AK's DER public key
        sa.Column("machine_id", sa.String(40), nullable=False),
        sa.Column("ek_id", sa.String(64)),
        sa.Column("secret_hash", sa.String(64)),  # the open challenge's secret (SHA-256), until answered
        sa.Column("challenged_at", sa.Integer),
        sa.Column("bound_at", sa.Integer),  # when ActivateCredential proved the AK lives beside the EK
        sa.Column("reset_count", sa.BigInteger),  # the highest (resetCount, clock) a verified quote showed
        sa.Column("clock", sa.BigInteger),
        sa.Column("seen_at", sa.Integer),
    )


def downgrade() -> None:
    op.drop_table("vault_tpm_keys")
