"""vault: the vendor's customers, sealed models, licenses and live leases

Revision ID: v001_vault
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "v001_vault"
down_revision = None
branch_labels = ("vault",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vault_customers",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        # Secrets are stored encrypted under the vendor's master key (AES-GCM, AAD = column + id).
        sa.Column("fingerprint_secret", sa.LargeBinary, nullable=False),
        sa.Column("watermark_secret", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
    )
    op.create_table(
        "vault_models",
        sa.Column("file_id", sa.String(40), primary_key=True),
        sa.Column("customer_id", sa.String(40), sa.ForeignKey("vault_customers.id"), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("format", sa.String(20), nullable=False),
        sa.Column("plaintext_size", sa.BigInteger, nullable=False),
        sa.Column("plaintext_sha256", sa.String(64), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("content_key", sa.LargeBinary, nullable=False),
        sa.Column("fingerprinted", sa.Boolean, nullable=False),
        sa.Column("source", sa.String(500), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
    )
    op.create_table(
        "vault_licenses",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("customer_id", sa.String(40), sa.ForeignKey("vault_customers.id"), nullable=False),
        sa.Column("file_id", sa.String(40), sa.ForeignKey("vault_models.file_id"), nullable=False),
        sa.Column("mode", sa.String(10), nullable=False),
        sa.Column("seats", sa.Integer, nullable=False),
        sa.Column("issued_at", sa.Integer, nullable=False),
        sa.Column("not_before", sa.Integer, nullable=False),
        sa.Column("expires", sa.Integer, nullable=False),
        sa.Column("lease_ttl", sa.Integer, nullable=True),
        sa.Column("grace", sa.Integer, nullable=True),
        sa.Column("revoked_at", sa.Integer, nullable=True),
        # Bumped inside every seat allocation: takes the row's write lock, so allocations serialise.
        sa.Column("lease_gen", sa.Integer, nullable=False, server_default="0"),
        sa.Column("document", sa.Text, nullable=False),
    )
    op.create_table(
        "vault_leases",
        sa.Column("license_id", sa.String(40), sa.ForeignKey("vault_licenses.id"), primary_key=True),
        sa.Column("machine_id", sa.String(40), primary_key=True),
        sa.Column("expires", sa.Float, nullable=False),
        sa.Column("renewed_at", sa.Float, nullable=False),
        sa.Column("renewals", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    for t in ("vault_leases", "vault_licenses", "vault_models", "vault_customers"):
        op.drop_table(t)
