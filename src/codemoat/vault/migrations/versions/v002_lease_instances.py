"""vault: a live lease is one seat of one serving process (instance) on a licensed machine

Revision ID: v002_lease_instances
Revises: v001_vault

Leases are short-lived state (they lapse after their TTL), so the table is recreated with the
instance in its key rather than migrated row by row: a process renewing across the upgrade takes
its seat again on its next renewal.
"""

import sqlalchemy as sa
from alembic import op

revision = "v002_lease_instances"
down_revision = "v001_vault"
branch_labels = None
depends_on = None


def _leases(instance: bool) -> None:
    cols = [
        sa.Column("license_id", sa.String(40), sa.ForeignKey("vault_licenses.id"), primary_key=True),
        sa.Column("machine_id", sa.String(40), primary_key=True),
    ]
    if instance:
        # The instance's Ed25519 public key (base64; "" for a client that names none): every
        # request for this seat is signed with its private key, which never leaves the process.
        cols.append(sa.Column("instance", sa.String(64), primary_key=True, server_default=""))
    cols += [
        sa.Column("expires", sa.Float, nullable=False),
        sa.Column("renewed_at", sa.Float, nullable=False),
        sa.Column("renewals", sa.Integer, nullable=False, server_default="0"),
    ]
    op.create_table("vault_leases", *cols)


def upgrade() -> None:
    op.drop_table("vault_leases")
    _leases(instance=True)


def downgrade() -> None:
    op.drop_table("vault_leases")
    _leases(instance=False)
