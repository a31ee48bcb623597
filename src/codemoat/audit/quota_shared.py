"""The daily token budget in the shared database, so that replicas enforce one budget, not one each.

Admission is one transaction of conditional increments:

    UPDATE quota_usage SET used = used + 1 WHERE key = :k AND day = :d AND used < :limit

for the token and for its user; if either matches no row the transaction rolls back and the request
is refused. So when a budget has one token left and two replicas admit at once, exactly one of them
gets it (the row lock serialises them on PostgreSQL; SQLite serialises writers). The admitted
request holds that one token; when it finishes, the rest of what it generated is added (or the
token given back when it generated none). As with one process, a request admitted below the limit
may finish above it: the budget stops the next request, not the one already running.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

metadata = sa.MetaData()
usage = sa.Table(
    "quota_usage",
    metadata,
    sa.Column("key", sa.String(160), primary_key=True),
    sa.Column("day", sa.Integer, primary_key=True),
    sa.Column("used", sa.BigInteger, nullable=False),
)


class _Spent(Exception):
    def __init__(self, key: str):
        self.key = key


class SharedDailyTokens:
    """Generated tokens per key and UTC day, counted in the database every replica shares."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def _ensure(self, c, keys: tuple[str, ...], day: int) -> None:
        have = set(c.execute(sa.select(usage.c.key).where(usage.c.key.in_(keys), usage.c.day == day)).scalars())
        for k in keys:
            if k not in have:
                try:
                    with c.begin_nested():  # another replica may insert the same row at the same moment
                        c.execute(usage.insert().values(key=k, day=day, used=0))
                except IntegrityError:
                    pass

    def admit(self, keys: tuple[str, ...], day: int, limit: int) -> str | None:
        """Reserve one token of `limit` under every key; the first key whose budget is spent, or None."""
        try:
            with self.engine.begin() as c:
                self._ensure(c, keys, day)
                for k in keys:
                    hit = c.execute(
                        usage.update()
                        .where(usage.c.key == k, usage.c.day == day, usage.c.used < limit)
                        .values(used=usage.c.used + 1)
                    ).rowcount
                    if hit != 1:
                        raise _Spent(k)  # rolls back the reservations made for the keys before it
        except _Spent as e:
            return e.key
        return None

    def add(self, keys: tuple[str, ...], day: int, n: int) -> None:
        """Add `n` (negative: give back) to every key's count for `day`."""
        if n == 0:
            return
        with self.engine.begin() as c:
            self._ensure(c, keys, day)
            c.execute(usage.update().where(usage.c.key.in_(keys), usage.c.day == day).values(used=usage.c.used + n))

    def used(self, key: str, day: int) -> int:
        with self.engine.connect() as c:
            return int(c.execute(sa.select(usage.c.used).where(usage.c.key == key, usage.c.day == day)).scalar() or 0)
