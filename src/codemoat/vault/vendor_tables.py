"""The vendor database's tables: customers, sealed models, licenses and the key server's leases."""

from __future__ import annotations

import sqlalchemy as sa

_meta = sa.MetaData()
customers_t = sa.Table(
    "vault_customers",
    _meta,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200)),
    sa.Column("fingerprint_secret", sa.LargeBinary),
    sa.Column("watermark_secret", sa.LargeBinary),
    sa.Column("created_at", sa.Integer),
)
models_t = sa.Table(
    "vault_models",
    _meta,
    sa.Column("file_id", sa.String(40), primary_key=True),
    sa.Column("customer_id", sa.String(40)),
    sa.Column("model_id", sa.String(200)),
    sa.Column("format", sa.String(20)),
    sa.Column("plaintext_size", sa.BigInteger),
    sa.Column("plaintext_sha256", sa.String(64)),
    sa.Column("manifest_sha256", sa.String(64)),
    sa.Column("content_key", sa.LargeBinary),
    sa.Column("fingerprinted", sa.Boolean),
    sa.Column("source", sa.String(500)),
    sa.Column("created_at", sa.Integer),
)
licenses_t = sa.Table(
    "vault_licenses",
    _meta,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("customer_id", sa.String(40)),
    sa.Column("file_id", sa.String(40)),
    sa.Column("mode", sa.String(10)),
    sa.Column("seats", sa.Integer),
    sa.Column("issued_at", sa.Integer),
    sa.Column("not_before", sa.Integer),
    sa.Column("expires", sa.Integer),
    sa.Column("lease_ttl", sa.Integer),
    sa.Column("grace", sa.Integer),
    sa.Column("revoked_at", sa.Integer),
    sa.Column("lease_gen", sa.Integer),
    sa.Column("document", sa.Text),
)
leases_t = sa.Table(
    "vault_leases",
    _meta,
    sa.Column("license_id", sa.String(40), primary_key=True),
    sa.Column("machine_id", sa.String(40), primary_key=True),
    sa.Column("instance", sa.String(64), primary_key=True),  # the serving process's public key ("" if none)
    sa.Column("expires", sa.Float),
    sa.Column("renewed_at", sa.Float),
    sa.Column("renewals", sa.Integer),
)
revocations_t = sa.Table(
    "vault_revocations",
    _meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(16)),
    sa.Column("subject", sa.String(128)),
    sa.Column("reason", sa.Text),
    sa.Column("revoked_at", sa.Integer),
)
