"""audit: the chain's tip in its own row; on PostgreSQL the database links each record (chain v2)

Revision ID: b003_audit_tip
Revises: b002_quota_usage

`audit_tip` holds the last record's seq and hash; the signed head (`audit_head`) now trails it by
at most `audit.sign_every` records. On PostgreSQL a BEFORE INSERT trigger numbers and links every
record inside the database (`audit.chain.link_hash`, byte for byte): the tip's row lock is held
from the INSERT to the COMMIT sent in the same network flush, never across a round trip to a
writer, so replicas appending at once no longer take turns at the network's pace. The writer puts
the record's body hash (`audit.chain.body_hash`) in `hash`; the trigger replaces it with the link.
"""

import sqlalchemy as sa
from alembic import op

revision = "b003_audit_tip"
down_revision = "b002_quota_usage"
branch_labels = None
depends_on = None

GENESIS = "0" * 64

_CHAIN = r"""
CREATE FUNCTION audit_chain() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  s bigint;
  p varchar(64);
BEGIN
  IF NEW.seq IS NOT NULL THEN
    RAISE EXCEPTION 'codemoat audit: record numbers are given by the chain, not by an INSERT'
      USING ERRCODE = 'unique_violation';
  END IF;
  SELECT seq, hash INTO s, p FROM audit_tip WHERE id = 1 FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'codemoat audit: the chain tip is missing' USING ERRCODE = 'no_data_found';
  END IF;
  NEW.seq := s + 1;
  NEW.prev_hash := p;
  NEW.hash := encode(sha256(convert_to('codemoat-audit-link-v2', 'UTF8') || '\x00'::bytea || int8send(s + 1)
                            || decode(p, 'hex') || decode(NEW.hash, 'hex')), 'hex');
  UPDATE audit_tip SET seq = NEW.seq, hash = NEW.hash WHERE id = 1;
  RETURN NEW;
END
$$;
CREATE TRIGGER audit_chain BEFORE INSERT ON audit_records FOR EACH ROW EXECUTE FUNCTION audit_chain();
"""


def upgrade() -> None:
    op.create_table(
        "audit_tip",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    bind = op.get_bind()
    last = bind.execute(sa.text("SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1")).first()
    bind.execute(
        sa.text("INSERT INTO audit_tip (id, seq, hash) VALUES (1, :s, :h)"),
        {"s": last[0] if last else 0, "h": last[1] if last else GENESIS},
    )
    if bind.dialect.name == "postgresql":
        bind.exec_driver_sql(_CHAIN)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        bind.exec_driver_sql("DROP TRIGGER audit_chain ON audit_records; DROP FUNCTION audit_chain()")
    op.drop_table("audit_tip")
