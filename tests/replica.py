"""A write made by another replica: its own connection to the shared database, not this process's engine."""

from __future__ import annotations

import sqlalchemy as sa


def write_elsewhere(database_url: str, statement: sa.Executable) -> None:
    """Run `statement` through a new engine on `database_url` and commit it, as another replica (or the CLI on
    another host) would: this process's engine sees no event of it, only the database's new rows."""
    other = sa.create_engine(database_url)
    try:
        with other.begin() as c:
            c.execute(statement)
    finally:
        other.dispose()
