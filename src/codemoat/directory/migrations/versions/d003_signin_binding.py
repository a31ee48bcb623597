"""directory: sign-ins bound to the browser that started them, and device-code logins (RFC 8628)

Revision ID: d003_signin_binding
Revises: d002_oidc_pending
"""

import sqlalchemy as sa
from alembic import op

revision = "d003_signin_binding"
down_revision = "d002_oidc_pending"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("oidc_pending") as b:
        b.add_column(sa.Column("purpose", sa.String(16), nullable=True))  # "api" or "console" (None: "api")
        b.add_column(sa.Column("binding", sa.String(64), nullable=True))  # SHA-256 of the starting browser's cookie
    op.create_table(
        "device_pending",
        sa.Column("id_hash", sa.String(64), primary_key=True),  # SHA-256 of the device code the CLI holds
        sa.Column("idp_code", sa.String(512), nullable=False),  # the provider's device code (never leaves the server)
        sa.Column("nonce", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=True),
        sa.Column("interval", sa.Integer, nullable=False),
        sa.Column("last_poll", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("used_at", sa.Float, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("device_pending")
    with op.batch_alter_table("oidc_pending") as b:
        b.drop_column("binding")
        b.drop_column("purpose")
