"""audit: hash-chained records, signed checkpoints, the signed head

Revision ID: b001_audit
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "b001_audit"
down_revision = None
branch_labels = ("audit",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_records",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("ts_us", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("user", sa.String(128)),
        sa.Column("token_id", sa.String(64)),
        sa.Column("route", sa.String(256)),
        sa.Column("protocol", sa.String(32)),
        sa.Column("model", sa.String(256)),
        sa.Column("repos", sa.Text),
        sa.Column("snippets", sa.Text),
        sa.Column("prompt_tokens", sa.Integer),
        sa.Column("completion_tokens", sa.Integer),
        sa.Column("latency_ms", sa.Float),
        sa.Column("status", sa.Integer),
        sa.Column("client", sa.String(128)),
        sa.Column("prompt_text", sa.Text),
        sa.Column("completion_text", sa.Text),
        sa.Column("detail", sa.Text),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_records_ts", "audit_records", ["ts_us"])
    op.create_index("ix_audit_records_kind", "audit_records", ["kind"])
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("prev_checkpoint", sa.BigInteger, nullable=False),
        sa.Column("ts_us", sa.BigInteger, nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
    )
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("last_checkpoint", sa.BigInteger, nullable=False),
        sa.Column("ts_us", sa.BigInteger, nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
    )


def downgrade() -> None:
    for t in ("audit_head", "audit_checkpoints", "audit_records"):
        op.drop_table(t)
